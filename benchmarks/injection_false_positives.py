"""Instruction detection on ordinary text: how many sentences of the shared 10-Q and regulated
PDFs the injection defences would drop from a prompt (each one is a fact the model no longer
sees, so the figure must stay near 0).

Every unit (sentence, table cell, heading; ``appliance.core.injection.units``) of every PDF is
checked by the cheap rules: the English patterns (``appliance.core.prompting``) and the addressed-
order rule (``appliance.core.injection.addresses_the_machine`` + ``directs_the_answer``). The
embedding detector runs on every unit that names a machine (where its looser rule applies) and
on a seeded random sample of the rest.

    .venv/bin/python benchmarks/injection_false_positives.py [--sample 320] [--seed 13] [--json]
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

from _common import CorpusMissing, corpus_pdfs, print_json, quiet_libraries, setup_logging


def corpus_units() -> list[str]:
    from appliance.core.injection import units
    from appliance.core.prompting import sanitize
    from ingest.chunking import extracted_text
    from ingest.parsers import parse_file

    out: list[str] = []
    for path in corpus_pdfs("all"):
        text = sanitize(extracted_text(parse_file(path).sections))
        out += [" ".join(text[a:b].strip(" |").split()) for a, b in units(text)]
    return out


def run(sample: int, seed: int) -> dict[str, Any]:
    from appliance.core.injection import (
        _ADDRESSEE,
        InstructionDetector,
        addresses_the_machine,
        directs_the_answer,
    )
    from appliance.core.prompting import _INSTRUCTION
    from ingest.embedders import SentenceTransformerEmbedder

    sentences = corpus_units()
    patterns = [s for s in sentences if _INSTRUCTION.search(s)]
    addressed = [s for s in sentences if addresses_the_machine(s) and directs_the_answer(s)]
    detector = InstructionDetector(SentenceTransformerEmbedder())
    named = [s for s in sentences if _ADDRESSEE.search(s)]
    named_flagged = [s for s, f in zip(named, detector.flags(named), strict=True) if f]
    pool = [s for s in sentences if 40 <= len(s) <= 400]
    drawn = random.Random(seed).sample(pool, min(sample, len(pool)))
    drawn_flagged = [s for s, f in zip(drawn, detector.flags(drawn), strict=True) if f]
    return {
        "units": len(sentences),
        "english_patterns": patterns,
        "addressed_order_rule": addressed,
        "naming_a_machine": len(named),
        "naming_a_machine_flagged": named_flagged,
        "sample": len(drawn),
        "sample_flagged": drawn_flagged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=320, help="sentences for the detector")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    try:
        r = run(args.sample, args.seed)
    except CorpusMissing as exc:
        print(f"injection_false_positives: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print_json(r)
        return 0
    print(f"Instruction detection on ordinary text: {r['units']} units of the shared PDFs")
    print(f"  English patterns            : {len(r['english_patterns'])} flagged")
    print(f"  addressed-order rule        : {len(r['addressed_order_rule'])} flagged")
    print(
        f"  detector, units naming a machine: {len(r['naming_a_machine_flagged'])} of "
        f"{r['naming_a_machine']}"
    )
    print(f"  detector, random sample     : {len(r['sample_flagged'])} of {r['sample']}")
    for key in ("english_patterns", "addressed_order_rule", "naming_a_machine_flagged"):
        for s in r[key]:
            print(f"    {key}: {s[:160]}")
    for s in r["sample_flagged"]:
        print(f"    sample: {s[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
