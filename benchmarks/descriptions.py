"""Dev index items written as people write a business down: how `search` ranks a code when
sentences about the firm (its history, size, place) surround the activity, and when the item's
own words are in their other number, misspelt or run together.

    python benchmarks/descriptions.py --from-checkpoint PATH.ckpt --data-dir data
    python benchmarks/descriptions.py --from-checkpoint PATH.ckpt search.query_max_length=32

Each dev item (``data/index_dev.parquet``, where every choice is made; never the held-out or
2017 sets) is put into each template, or altered by each change of its words (drawn with a fixed
seed, so every run and every model gets the same texts), and searched as one query; top-1 and
top-5 over the dev items are printed per form, the items alone first. The search settings come
from ``--config`` with any ``KEY=VALUE`` overrides after it, as the commands take them
(docs/results.md, "Descriptions of several sentences" and "BM25 for the lexical signal").
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from naics_mlflow.config import load_config
from naics_mlflow.data.taxonomy import DEV_FILE, load_taxonomy
from naics_mlflow.evaluation.lexical import WORD, singular
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model.merged import inference_device
from naics_mlflow.model.trained import load_embedder

REPO = Path(__file__).resolve().parents[1]

# {Item} is the dev item as written, {item} the same with its first letter lowered (as measured in
# docs/results.md).
TEMPLATES = {
    "the item alone": "{Item}",
    "history, then the activity": (
        "Our company was founded in 1998 and is a family-owned business with 25 employees serving "
        "customers across the region. We specialize in {item}."
    ),
    "the activity, then the firm": (
        "{item}. We are a small family-owned business founded in 2005, with 12 employees and two "
        "locations, and we plan to expand next year."
    ),
    "the activity between": (
        "Founded in 2011 in a small town, our firm employs about 40 people. Main activity: {item}. "
        "We also keep a website and a small office downtown."
    ),
    "abbreviations": (
        "ACME Corp. is a U.S. company, est. 1990 in St. Louis. Our business: {item}. Contact us "
        "at info@acme.com."
    ),
    "one long sentence": (
        "Our family-owned company, founded in 1998 with 25 employees serving customers across the "
        "region, specializes in {item}"
    ),
}


def templated(template: str) -> Callable[[str], str]:
    return lambda item: template.format(Item=item, item=item[:1].lower() + item[1:])


def in_other_number(known: set[str], every: bool) -> Callable[[str], str]:
    """Each word (or only the last) whose other number the codes' documents use, put in it:
    "Used car dealers" becomes "Used car dealer"."""

    def other(word: str) -> str | None:
        lower = word.lower()
        one = singular(lower)
        if one != lower and one in known:
            return word[: len(one)] if lower.startswith(one) else one
        plurals = [lower + "s", lower + "es", lower[:-1] + "ies" if lower.endswith("y") else ""]
        for plural in plurals:
            if plural in known and singular(plural) == lower:
                return word + plural[len(lower) :] if plural.startswith(lower) else plural
        return None

    def alter(item: str) -> str:
        found = [(m.start(), m.end(), other(m.group())) for m in WORD.finditer(item)]
        found = [place for place in found if place[2]]
        for start, end, replacement in reversed(found if every else found[-1:]):
            item = item[:start] + replacement + item[end:]
        return item

    return alter


def with_a_slip(longest: bool) -> Callable[[str], str]:
    """One letter deleted, two swapped, one replaced or one inserted, inside the item's longest
    word or a word drawn at random, of 5 letters or more."""
    draw = random.Random(0)

    def alter(item: str) -> str:
        words = [m for m in WORD.finditer(item) if len(m.group()) >= 5]
        if not words:
            return item
        chosen = max(words, key=lambda m: len(m.group())) if longest else draw.choice(words)
        word, at = chosen.group(), draw.randrange(1, len(chosen.group()) - 1)
        letter = draw.choice(string.ascii_lowercase)
        slipped = draw.choice(
            [
                word[:at] + word[at + 1 :],
                word[:at] + word[at + 1] + word[at] + word[at + 2 :],
                word[:at] + letter + word[at + 1 :],
                word[:at] + letter + word[at:],
            ]
        )
        return item[: chosen.start()] + slipped + item[chosen.end() :]

    return alter


def run_together() -> Callable[[str], str]:
    """One space between two words, drawn at random, taken out."""
    draw = random.Random(0)

    def alter(item: str) -> str:
        spaces = [m.start() + 1 for m in re.finditer(r"[^\W\d_] (?=[^\W\d_])", item)]
        if not spaces:
            return item
        at = draw.choice(spaces)
        return item[:at] + item[at + 1 :]

    return alter


def forms(documents: list[str]) -> dict[str, Callable[[str], str]]:
    """Each way of writing a dev item, by name."""
    known = {word for text in documents for word in WORD.findall(text.lower())}
    return {
        **{name: templated(template) for name, template in TEMPLATES.items()},
        "last word in its other number": in_other_number(known, every=False),
        "every word in its other number": in_other_number(known, every=True),
        "a slip in the longest word": with_a_slip(longest=True),
        "a slip in any word": with_a_slip(longest=False),
        "two words run together": run_together(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-checkpoint", type=Path, required=True, metavar="PATH")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--config", type=Path, default=REPO / "conf" / "config.yaml")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    config = load_config(args.config, args.overrides)
    module = load_embedder(args.from_checkpoint, inference_device(config.search.device))
    engine = SearchEngine.build(
        module, load_taxonomy(args.data_dir), config.search, Path(config.dirs.outputs)
    )
    dev = pd.read_parquet(args.data_dir / DEV_FILE)
    report = {}
    for name, written in forms(engine.lexical.texts).items():
        texts = [written(item) for item in dev.text]
        started = time.perf_counter()
        found = engine.search(texts, top_k=5)
        codes = [[match.code for match in matches] for matches in found]
        report[name] = {
            "top1": sum(c[0] == gold for c, gold in zip(codes, dev.code, strict=True)) / len(dev),
            "top5": sum(gold in c for c, gold in zip(codes, dev.code, strict=True)) / len(dev),
            "seconds": time.perf_counter() - started,
        }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{len(dev):,} dev items, search.query_max_length {config.search.query_max_length}")
    for name, figures in report.items():
        print(
            f"{name:32s} top-1 {figures['top1']:.4f}  top-5 {figures['top5']:.4f}  "
            f"({figures['seconds']:.0f} s)"
        )


if __name__ == "__main__":
    main()
