"""``make demo``: the whole pipeline end to end on small DocMNIST datasets, on the CPU or a GPU (docs/performance.md).

Runs a miniature complexity sweep (one seed: generate, preprocess, stage 1, ViLLA stage 2, CLIP baseline,
evaluation), then prints the stage-1 mapping quality, the retrieval table and where the plot is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from villa.storage.errors import exit_on_error
from villa.storage.paths import project_dir

DEMO = {
    "complexities": [4, 16],
    "attribute_budget": 3000,
    "val_attribute_budget": 1000,
    "test_attribute_budget": 1000,
    "stage1": {"epochs": 30},
    "stage2": {"epochs": 6, "batch_size": 32},
    # the ablations (all_regions, random_mapping, oracle) would double the demo's stage-2 time
    "methods": ["villa", "clip", "untrained"],
}


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from villa.docmnist.complexity_sweep import format_results, read_split_metrics, run_sweep
    from villa.evaluation.report import fmt

    out_dir = Path(argv[0]) if argv else project_dir() / "results" / "demo"
    started = time.perf_counter()
    print(f"villa demo: a miniature DocMNIST complexity sweep into {out_dir}", flush=True)
    results = run_sweep(out_dir=out_dir, device="auto", progress=False, **DEMO)
    print("\nStage 1 mapping quality (test split, %):")
    print(f"{'T':>4} {'precision':>10} {'recall':>8} {'f1':>6}")
    for complexity in DEMO["complexities"]:
        test = read_split_metrics(out_dir, complexity)
        print(
            f"{complexity:>4} {fmt(test['precision'], '>10.1f')} {fmt(test['recall'], '>8.1f')} "
            f"{fmt(test['f1'], '>6.1f')}"
        )
    print("\nRetrieval on the test split (%):")
    print(format_results(results))
    print(f"\nplot: {out_dir / 'results.png'}   table: {out_dir / 'results.csv'}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
