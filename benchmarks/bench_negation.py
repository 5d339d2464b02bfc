"""Speed of the vocabulary matcher with negation and uncertainty handling, on report-style text.

    python benchmarks/bench_negation.py [--sentences=6000 --repeats=5 --libraries]

Generates ``--sentences`` synthetic radiology-report sentences (seeded templates of findings stated present,
negated, uncertain, changed, mixed across "but" / ";", and filler; six sentences per report) and times, on
ONE core (the process is pinned to one CPU, ``OMP_NUM_THREADS=1``), the whole matcher a stage calls:

* ``policy``: ``Vocabulary.match_matrix`` with ``negated: drop, uncertain: keep`` (every mention's assertion
  status read, villa's default);
* ``naive``: the same call with ``negated: keep, uncertain: keep``, which reads no status (every mention
  counts): the matcher without negation handling, the baseline in the same process.

Each figure is the best of ``--repeats`` runs, in report sentences per second. It also prints how well the
statuses match the templates' own labels (a sanity check on text the triggers were written for, not an
independent evaluation: for that see ``benchmarks/eval_negex.py``).

With ``--libraries`` (needs ``spacy``, ``negspacy`` and ``medspacy`` importable, e.g. in a throw-away
virtual environment: ``pip install spacy negspacy medspacy==1.0.0 numpy pyyaml``), it also times negspaCy's
NegEx and medspaCy's ConText on a blank English pipeline (sentencizer + an entity ruler / target matcher of
the same findings) over the same reports: the libraries villa could have used instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from villa.datasets.assertion import NEGATED, PRESENT, UNCERTAIN  # noqa: E402
from villa.datasets.vocabulary import Vocabulary  # noqa: E402

FINDINGS = (
    "pleural effusion", "pneumothorax", "cardiomegaly", "consolidation", "atelectasis", "pulmonary edema",
    "pneumonia", "lung opacity", "fracture", "lung lesion", "enlarged cardiomediastinum", "hilar adenopathy",
    "nodule", "emphysema",
)  # fmt: skip
P, N, U = PRESENT, NEGATED, UNCERTAIN
# (template, status of {f}, of {g}, of {h}); {F} is {f} capitalised, {m} a size word or nothing
TEMPLATES = {
    "present": (
        ("There is {m}{f} in the {loc}.", P, 0, 0), ("{M}{f} is seen.", P, 0, 0),
        ("Findings are consistent with {f}.", P, 0, 0), ("{M}{f} at the {loc}.", P, 0, 0),
        ("Interval increase in {f}.", P, 0, 0), ("No change in {f}.", P, 0, 0),
        ("No interval change in the {m}{f}.", P, 0, 0), ("The {f} is unchanged.", P, 0, 0),
        ("Stable {f} and {g}.", P, P, 0), ("{M}{f} with associated {g}.", P, P, 0),
    ),
    "negated": (
        ("No {f}.", N, 0, 0), ("No evidence of {f} or {g}.", N, N, 0), ("There is no {f}.", N, 0, 0),
        ("{F} is absent.", N, 0, 0), ("Negative for {f}.", N, 0, 0), ("{F} has been ruled out.", N, 0, 0),
        ("No {f} is identified.", N, 0, 0), ("Without {f}.", N, 0, 0), ("No {f}, {g}, or {h}.", N, N, N),
        ("{F} is not seen.", N, 0, 0), ("The lungs are clear without {f}.", N, 0, 0),
    ),
    "uncertain": (
        ("Possible {f}.", U, 0, 0), ("{F} cannot be excluded.", U, 0, 0), ("Findings may represent {f}.", U, 0, 0),
        ("Likely {f} in the {loc}.", U, 0, 0), ("Suspicious for {f}.", U, 0, 0),
        ("Questionable {f} in the {loc}.", U, 0, 0), ("{F} is not ruled out.", U, 0, 0),
    ),
    "mixed": (
        ("No {f}, but {m}{g} in the {loc}.", N, P, 0), ("Negative for {f}; possible {g}.", N, U, 0),
        ("No {f}. {M}{g}.", N, P, 0), ("There is no {f} however {m}{g} is present.", N, P, 0),
    ),
    "filler": (
        ("The heart size is normal.", 0, 0, 0), ("Lines and tubes are in standard position.", 0, 0, 0),
        ("The osseous structures are intact.", 0, 0, 0),
    ),
}  # fmt: skip
GROUP_SHARE = {"present": 0.35, "negated": 0.30, "uncertain": 0.12, "mixed": 0.08, "filler": 0.15}
LOCATIONS = ("right lower lobe", "left apex", "left lung base", "right hilum")
SIZES = ("", "mild ", "small ", "moderate ", "large ")


def report_sentences(n: int, seed: int = 0) -> tuple[list[str], list[dict[str, int]]]:
    """``n`` seeded report sentences and, for each, ``{finding: status}`` of the findings it names."""
    rng = np.random.default_rng(seed)
    groups = list(GROUP_SHARE)
    sentences, labels = [], []
    for _ in range(n):
        f, g, h = (str(x) for x in rng.choice(FINDINGS, 3, replace=False))
        group = TEMPLATES[groups[int(rng.choice(len(groups), p=list(GROUP_SHARE.values())))]]
        template, *statuses = group[int(rng.integers(len(group)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        text = template.format(
            f=f, g=g, h=h, F=f.capitalize(), m=size, M=size.capitalize(), loc=LOCATIONS[int(rng.integers(4))]
        )
        sentences.append(text[0].upper() + text[1:])
        labels.append({name: s for name, s in zip((f, g, h), statuses) if s})
    return sentences, labels


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def best_rate(run, count: int, repeats: int) -> float:
    """``count`` / the fastest of ``repeats`` calls of ``run``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return count / min(times)


def library_rates(reports: list[str], count: int, repeats: int) -> dict[str, float]:
    """negspaCy and medspaCy sentences/s on ``reports`` (blank English pipelines)."""
    import spacy
    from medspacy.target_matcher import TargetRule
    from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)

    negex = spacy.blank("en")
    negex.add_pipe("sentencizer")
    ruler = negex.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "FINDING", "pattern": [{"LOWER": w} for w in f.split()]} for f in FINDINGS])
    negex.add_pipe("negex", config={"ent_types": ["FINDING"]})

    context = spacy.blank("en")
    context.add_pipe("sentencizer")
    context.add_pipe("medspacy_target_matcher").add([TargetRule(f, "FINDING") for f in FINDINGS])
    context.add_pipe("medspacy_context")

    def run(nlp, flag: str):
        return lambda: [getattr(e._, flag) for d in nlp.pipe(reports) for e in d.ents]

    return {
        "negspacy (NegEx, spaCy blank en)": best_rate(run(negex, "negex"), count, repeats),
        "medspacy (ConText, spaCy blank en)": best_rate(run(context, "is_negated"), count, repeats),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=6000)
    parser.add_argument("--per_report", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--libraries", action="store_true", help="also time negspaCy and medspaCy")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    sentences, labels = report_sentences(args.sentences, args.seed)
    reports = [
        " ".join(sentences[i : i + args.per_report]) for i in range(0, len(sentences), args.per_report)
    ]
    policy = Vocabulary.from_names(FINDINGS)  # negated: drop, uncertain: keep
    naive = policy.with_policy(negated="keep", uncertain="keep")
    print(f"machine: {machine()}; pinned to 1 core")
    print(f"{len(sentences)} report sentences in {len(reports)} reports, {len(FINDINGS)} findings")
    rates = {
        "villa, negated: drop, uncertain: keep": best_rate(
            lambda: policy.match_matrix(reports), len(sentences), args.repeats
        ),
        "villa, negated: keep, uncertain: keep (naive)": best_rate(
            lambda: naive.match_matrix(reports), len(sentences), args.repeats
        ),
    }
    if args.libraries:
        rates.update(library_rates(reports, len(sentences), args.repeats))
    for name, rate in rates.items():
        print(f"{name:>48}: {rate:>9,.0f} sentences/s")

    # sanity check against the templates' labels, sentence by sentence
    read = policy.status_matrix(sentences)
    index = {f: k for k, f in enumerate(FINDINGS)}
    gold = np.zeros_like(read)
    for row, label in enumerate(labels):
        for name, status in label.items():
            gold[row, index[name]] = status
    agree = float((read == gold)[gold > 0].mean())
    print(f"{'status as labelled by the templates':>48}: {agree:.1%} of {int((gold > 0).sum())} mentions")
    print(f"machine after: {machine()}")
    return {"rates": rates, "template_agreement": agree}


if __name__ == "__main__":
    main()
