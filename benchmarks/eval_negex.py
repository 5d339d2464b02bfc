"""Negation precision, recall and F1 of villa's assertion reader on the NegEx test kit (Chapman et al.).

    python benchmarks/eval_negex.py --annotations=Annotations-1-120.txt [--window=8] [--errors=20]

The NegEx test kit holds 2,376 sentences from 120 de-identified clinical reports, each with one annotated
concept (upper-cased in the sentence) and its status, ``Affirmed`` or ``Negated``. It is published with
NegEx (the GeneralNegEx Java release and negex.python, Apache License 2.0; ``Annotations-1-120.txt``,
sha256 7e844c5e...98dc7) and is not shipped by any package on the registries villa installs from, so it is
not part of the repository: give its path. The file format is ``Report No. TAB Concept TAB Sentence TAB
Negation`` with one header line; the ``rsAnnotations-1-120-random.txt`` variant (six columns, statuses
``negated`` / ``affirmed`` / ``possible``) is read too, and then uncertainty is scored as well.

Each concept's mention is its last upper-cased occurrence in the sentence (an upper-case section header such as
"ALLERGIES:" can come first), else its first occurrence in any case;
its status comes from :func:`villa.datasets.assertion.mention_status` on all sentences at once, as the
vocabulary's matcher computes it. A mention read as uncertain counts as not negated.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from villa.datasets.assertion import NEGATED, UNCERTAIN, WINDOW, mention_status, normalise  # noqa: E402

KNOWN_SHA256 = {
    "7e844c5ea0a0ef0d16f1308fa1074c00e0fb31cfbe38a61999d34a56a2d98dc7": "negex.python/Annotations-1-120.txt",
    "e2f652f663617ff661c7863c76075be9ae492c6ef5070d44d2d023bdf6d35b71": "GeneralNegEx/Annotations-1-120-random.txt",
    "63763b4dcd97e7874dd3162b8a87103f8205bbe1a0f1f64669ad3f29e97b53c8": "rsAnnotations-1-120-random.txt",
}


def read_kit(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(concepts, sentences, gold labels lower-cased) of a NegEx test kit file."""
    concepts, sentences, labels = [], [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 4 or not row[0].strip().isdigit():
                continue  # the header line
            concepts.append(row[1].strip().strip('"'))
            sentences.append(row[2].strip().strip('"'))
            labels.append(row[3].strip().lower())
    return concepts, sentences, labels


def locate(concept: str, sentence: str) -> tuple[int, int] | None:
    """Character span of the annotated concept in ``sentence`` (upper-cased occurrence first), or None when
    the sentence does not hold it (a few concepts of the kit run past their sentence's end)."""
    pattern = r"\s+".join(map(re.escape, concept.split()))
    upper = list(re.finditer(r"(?<!\w)" + pattern.upper() + r"(?!\w)", sentence))
    # the last upper-cased occurrence: an upper-case section header ("ALLERGIES: no known ALLERGIES") comes first
    found = upper[-1] if upper else re.search(r"(?<!\w)" + pattern + r"(?!\w)", sentence, flags=re.IGNORECASE)
    return None if found is None else found.span()


def scores(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    tp = int((predicted & gold).sum())
    fp = int((predicted & ~gold).sum())
    fn = int((~predicted & gold).sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def evaluate(path: Path, window: int = WINDOW) -> tuple[dict, list[str], list[str], np.ndarray, np.ndarray]:
    concepts, sentences, labels = read_kit(path)
    spans = [locate(c, s) for c, s in zip(concepts, sentences)]
    missing = sum(span is None for span in spans)
    keep = [i for i, span in enumerate(spans) if span is not None]
    concepts, sentences = [concepts[i] for i in keep], [sentences[i] for i in keep]
    labels, spans = [labels[i] for i in keep], np.asarray([spans[i] for i in keep], dtype=np.int64)
    # the sentence is normalised whole (its length unchanged by lower-casing for this ASCII corpus)
    lowered = [normalise(s) for s in sentences]
    if any(len(a) != len(b) for a, b in zip(lowered, sentences)):
        raise SystemExit("lower-casing changed a sentence's length: spans would not line up")
    offsets = np.concatenate([[0], np.cumsum([len(s) + 1 for s in lowered])[:-1]])
    status = mention_status("\0".join(lowered), spans[:, 0] + offsets, spans[:, 1] + offsets, window=window)
    gold = np.asarray(labels)
    result = {
        "pairs": len(gold),
        "not_found": missing,
        "negated": scores(status == NEGATED, gold == "negated"),
        "negated_or_uncertain": scores(status != 1, gold != "affirmed"),
    }
    if (gold == "possible").any():
        result["uncertain"] = scores(status == UNCERTAIN, gold == "possible")
    return result, sentences, concepts, status, gold


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotations", required=True, type=Path, help="the NegEx test kit file")
    parser.add_argument(
        "--window", type=int, default=WINDOW, help="scope window in words (default: %(default)s)"
    )
    parser.add_argument("--errors", type=int, default=0, help="print this many misread sentences")
    args = parser.parse_args(argv)
    digest = hashlib.sha256(args.annotations.read_bytes()).hexdigest()
    print(f"file: {args.annotations} sha256 {digest} ({KNOWN_SHA256.get(digest, 'not a known release')})")
    result, sentences, concepts, status, gold = evaluate(args.annotations, args.window)
    print(
        f"{result['pairs']} annotated concept mentions ({result['not_found']} left out: the concept is not in its "
        f"sentence), window {args.window} words"
    )
    for name in ("negated", "negated_or_uncertain", "uncertain"):
        if name in result:
            r = result[name]
            print(
                f"{name:>21}: precision {r['precision']:.3f}  recall {r['recall']:.3f}  F1 {r['f1']:.3f}"
                f"  (tp {r['tp']}, fp {r['fp']}, fn {r['fn']})"
            )
    wrong = np.flatnonzero((status == NEGATED) != (gold == "negated"))
    for i in wrong[: args.errors].tolist():
        print(
            f"  gold {gold[i]:>8}, read {int(status[i])}: [{concepts[i]}] {' '.join(sentences[i].split())[:200]}"
        )
    return result


if __name__ == "__main__":
    main()
