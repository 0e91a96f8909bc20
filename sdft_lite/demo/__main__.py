"""`python -m sdft_lite.demo {build,data,measure}`: rebuild or check the demo model and data."""

from __future__ import annotations

import argparse
import json
import logging
import time

from . import DEFAULT_STEPS, build, demo_data_dir, demo_model_path, measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdft_lite.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="write the data files, pretrain and save the demo model")
    p_build.add_argument("--out", default=None, help="model folder (default: the packaged one)")
    p_build.add_argument("--data-dir", default=None, help="data folder (default: recipes/data/demo)")
    p_build.add_argument("--seed", type=int, default=0)
    p_build.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="pretraining steps")
    p_data = sub.add_parser("data", help="write the data files only")
    p_data.add_argument("--data-dir", default=None)
    p_data.add_argument("--seed", type=int, default=0)
    p_measure = sub.add_parser("measure", help="print greedy exact-match accuracies as JSON")
    p_measure.add_argument("--model", default=None, help="model folder (default: the packaged one)")
    p_measure.add_argument("--data-dir", default=None)
    p_measure.add_argument("--limit", type=int, default=None, help="rows per file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.command == "build":
        start = time.time()
        out = build(args.out, args.data_dir, seed=args.seed, steps=args.steps)
        print(f"saved {out} in {time.time() - start:.0f}s")
        data_dir = args.data_dir or demo_data_dir()
        print(json.dumps(measure(out, data_dir), indent=2))
    elif args.command == "data":
        from .tasks import write_data_files

        write_data_files(args.data_dir or demo_data_dir(), seed=args.seed)
    else:
        model = args.model or demo_model_path()
        print(json.dumps(measure(model, args.data_dir or demo_data_dir(), limit=args.limit), indent=2))


if __name__ == "__main__":
    main()
