"""OCR quality and speed: character accuracy on a page of known text, seconds per page.

Renders known text (12 pt Helvetica, the test suite's page) to an image at 200 dpi, saves it as
an image-only PDF (a scan), and parses it with the real parser (``ingest.parsers.parse_file``:
pdfium renders the page at ``ocr.dpi``, the configured engine reads it). It reports

- character accuracy: 1 - edit distance / length of the known text (whitespace runs as one);
- seconds per OCR'd page (best and median of ``--pages`` pages), and the ratio to parsing the
  same page from its text layer in the same process (what OCR costs over a text PDF);
- the peak memory of the OCR child process (Tesseract), against ``ingest.parse_memory_mb``;
- the same for the shared scanned protocol (``regulated/nih-clinical-trial-protocols/
  NCT06155240_Prot_SAP_000.pdf``) when the shared corpus is there: seconds and confidence.

    .venv/bin/python benchmarks/ocr_quality.py [--pages N] [--dpi 300] [--json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import EVAL, machine, print_json, ratio

PROTOCOL = EVAL / "regulated" / "nih-clinical-trial-protocols" / "NCT06155240_Prot_SAP_000.pdf"
LINES = (
    "Clinical Study Protocol",
    "The study enrolls 120 participants aged 18 to 65 years.",
    "Participants receive 50 mg of the study drug twice daily for 12 weeks.",
    "The primary endpoint is the change in systolic blood pressure at week 12.",
    "Adverse events are recorded at every visit and reported within 24 hours.",
    "Blood samples are stored at minus 80 degrees Celsius for five years.",
    "The sponsor may stop the study early for safety reasons.",
    "Data are analysed with a mixed model for repeated measures.",
)


def write_pages(folder: Path) -> tuple[Path, Path]:
    """(the text PDF, the same page as an image-only PDF scanned at 200 dpi)."""
    import pypdfium2 as pdfium
    from reportlab.pdfgen import canvas

    text_pdf = folder / "page.pdf"
    pdf = canvas.Canvas(str(text_pdf), invariant=1)
    y = 720
    for line in LINES:
        pdf.setFont("Helvetica", 12)
        pdf.drawString(72, y, line)
        y -= 20
    pdf.save()
    document = pdfium.PdfDocument(text_pdf)
    image = document[0].render(scale=200 / 72).to_pil().convert("L")
    document.close()
    scan = folder / "scan.pdf"
    image.save(scan, format="PDF", resolution=200)
    return text_pdf, scan


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ingest.ocr import OcrOptions, character_accuracy
    from ingest.parsers import ParseOptions, parse_file

    options = ParseOptions(ocr=OcrOptions(dpi=args.dpi))
    truth = "\n".join(LINES)
    with tempfile.TemporaryDirectory(prefix="ocr-quality-") as tmp:
        text_pdf, scan = write_pages(Path(tmp))
        parse_file(text_pdf, options)  # the libraries are imported before any clock starts
        text_times, ocr_times, accuracies, confidences = [], [], [], []
        for _ in range(args.pages):
            start = time.perf_counter()
            parse_file(text_pdf, options)
            text_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            doc = parse_file(scan, options)
            ocr_times.append(time.perf_counter() - start)
            accuracies.append(character_accuracy(truth, doc.sections[0].text))
            confidences.append(doc.sections[0].ocr_confidence)
    result: dict[str, Any] = {
        "engine": options.ocr.engine,
        "languages": list(options.ocr.languages),
        "dpi": args.dpi,
        "pages": args.pages,
        "char_accuracy": round(min(accuracies), 4),
        "confidence": confidences[0],
        "ocr_s_per_page": {
            "best": round(min(ocr_times), 3),
            "median": round(statistics.median(ocr_times), 3),
        },
        "text_layer_s_per_page": round(statistics.median(text_times), 4),
        "ratio_ocr_to_text_layer": ratio(
            statistics.median(ocr_times), statistics.median(text_times)
        ),
        "child_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "machine": machine(),
    }
    if PROTOCOL.is_file():
        start = time.perf_counter()
        doc = parse_file(PROTOCOL, options)
        result["protocol"] = {
            "pages": doc.pages,
            "seconds": round(time.perf_counter() - start, 2),
            "confidence": doc.sections[0].ocr_confidence,
            "chars": sum(len(s.text) for s in doc.sections),
        }
    return result


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"OCR ({r['engine']}, {'+'.join(r['languages'])}, {r['dpi']} dpi), {m['cpus']} CPUs")
    print(
        f"  generated page (12 pt Helvetica scanned at 200 dpi), {r['pages']} runs: "
        f"character accuracy {r['char_accuracy']:.4f} (worst run), confidence {r['confidence']}"
    )
    s = r["ocr_s_per_page"]
    print(
        f"  OCR seconds per page: best {s['best']:.2f}, median {s['median']:.2f}; the same page "
        f"from its text layer {r['text_layer_s_per_page'] * 1000:.1f} ms "
        f"(ratio OCR / text layer = {r['ratio_ocr_to_text_layer']})"
    )
    print(f"  peak memory of the OCR process: {r['child_peak_rss_mb']} MB")
    if "protocol" in r:
        p = r["protocol"]
        print(
            f"  scanned protocol: {p['pages']} page(s) in {p['seconds']:.1f} s, "
            f"confidence {p['confidence']}, {p['chars']} characters read"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=3, help="OCR runs of the generated page")
    parser.add_argument("--dpi", type=int, default=300, help="the setting ocr.dpi")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from appliance.core.errors import ParseError

    try:
        result = run(args)
    except ParseError as exc:  # no engine: the reason says how to install it
        print(f"ocr_quality: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
