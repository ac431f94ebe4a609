"""``make bench``: side-by-side measurements, printed with their ratios.

Preparation (bench/prepare_bench.py), then training (bench/train_bench.py).
"""

from __future__ import annotations

import logging


def main() -> None:
    logging.disable(logging.WARNING)
    from bench import prepare_bench, train_bench

    prepare_bench.main()
    print()
    train_bench.main()


if __name__ == "__main__":
    main()
