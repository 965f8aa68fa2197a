"""Train SampleNet (multinomial attack, Table 1) with the default recipe and print how closely it
imitates the exact sampler of equation 1 (see :func:`veil.triggers.multinomial.samplenet_imitation_error`).

Usage: ``python scripts/measure_samplenet.py``
"""

from __future__ import annotations

import json
import time

from veil.triggers.multinomial import samplenet_imitation_error, train_samplenet

if __name__ == "__main__":
    t0 = time.perf_counter()
    net = train_samplenet()
    seconds = time.perf_counter() - t0
    print(json.dumps({"train_seconds": round(seconds, 2), **samplenet_imitation_error(net)}, indent=2))
