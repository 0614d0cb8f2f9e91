"""Businesses described in everyday words, not the index's: how a model ranks them, through the
commands themselves.

    python benchmarks/everyday.py --from-checkpoint PATH.ckpt
    python benchmarks/everyday.py --from-checkpoint quickstart --config conf/config.yaml

The descriptions below were written by hand (2026-12-05) as a business owner might put their
trade ("we fix people's teeth", "temp agency"), each with the national industry a coder would
give it; every code was checked against its NAICS 2022 title. They are a report, like the
held-out set: no setting is chosen on them (docs/results.md, "Businesses in everyday words").

The script writes them to a CSV and runs ``naics-embedder evaluate --unseen-queries`` on it, so
they are scored as every query set is (all five systems, the run logged in the store), then
``naics-embedder search --input`` for the descriptions whose code does not come first.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# (national industry, description)
DESCRIPTIONS = [
    ("621210", "we fix people's teeth"),
    ("485310", "I drive for Uber and Lyft"),
    ("541211", "CPA firm doing audits for small companies"),
    ("812910", "dog grooming salon"),
    ("811210", "we repair cracked phone screens"),
    ("722330", "food truck selling tacos"),
    ("722511", "sit-down restaurant with waiters and a full menu"),
    ("722513", "burger drive-through where you pay at the counter"),
    ("722515", "coffee shop"),
    ("722410", "neighborhood bar that serves beer and cocktails"),
    ("311811", "bakery that bakes bread and sells it in the same shop"),
    ("238220", "plumber who fixes leaks and installs water heaters"),
    ("238210", "electrician wiring new houses"),
    ("238160", "we put new roofs on houses"),
    ("236118", "home remodeling of kitchens and bathrooms"),
    ("236115", "we build new single-family homes for their owners"),
    ("561730", "lawn mowing and yard care"),
    ("561720", "house cleaning service"),
    ("812111", "barber shop"),
    ("812113", "manicures and pedicures"),
    ("812112", "hair salon cutting and coloring women's hair"),
    ("541921", "wedding photographer"),
    ("624410", "daycare for toddlers"),
    ("611110", "private elementary school"),
    ("713940", "gym with weights and fitness classes"),
    ("621111", "family doctor's practice"),
    ("621310", "chiropractor"),
    ("541940", "animal hospital for cats and dogs"),
    ("456110", "drugstore filling prescriptions"),
    ("445110", "grocery store"),
    ("445131", "corner shop selling snacks and drinks and lottery tickets"),
    ("457110", "gas station with a convenience store"),
    ("441110", "car dealership selling new cars"),
    ("811111", "auto repair garage"),
    ("811192", "car wash"),
    ("531110", "we rent out apartments we own"),
    ("531210", "real estate agent helping people buy houses"),
    ("524210", "insurance agency selling car and home policies"),
    ("522110", "community bank taking deposits and making loans"),
    ("541110", "law firm"),
    ("541511", "we write custom software for clients"),
    ("513210", "company selling a mobile app subscription"),
    ("518210", "cloud hosting and data center services"),
    ("541810", "advertising agency"),
    ("541613", "marketing consulting"),
    ("541330", "engineering firm designing bridges"),
    ("541310", "architect designing houses"),
    ("484121", "long-haul trucking company"),
    ("492210", "bike courier delivering packages in the city"),
    ("493110", "warehouse storing goods for other companies"),
    ("481111", "airline flying passengers"),
    ("721110", "hotel"),
    ("721191", "bed and breakfast"),
    ("111150", "corn farm"),
    ("112120", "dairy farm milking cows"),
    ("111332", "vineyard growing grapes"),
    ("312130", "winery making wine"),
    ("312120", "craft brewery"),
    ("311351", "chocolate factory making candy bars from cocoa beans"),
    ("323111", "print shop printing flyers and business cards"),
    ("337110", "we build custom kitchen cabinets"),
    ("332710", "machine shop"),
    ("336110", "car factory"),
    ("325412", "pharmaceutical company making pills"),
    ("334413", "we make computer chips"),
    ("211120", "oil drilling company producing crude oil"),
    ("221114", "solar farm selling electricity to the grid"),
    ("562111", "garbage collection"),
    ("562920", "recycling center sorting bottles and cans"),
    ("812210", "funeral home"),
    ("813110", "church"),
    ("711130", "rock band playing concerts"),
    ("512110", "film production company"),
    ("611620", "karate school for kids"),
    ("611692", "driving school"),
    ("561612", "security guards for events"),
    ("561320", "temp agency"),
    ("621610", "nurses visiting patients at home"),
    ("623110", "nursing home"),
    ("621420", "outpatient addiction counseling clinic"),
    ("541380", "lab testing soil and water samples"),
    ("488410", "tow truck service"),
    ("532111", "car rental at the airport"),
    ("713110", "amusement park with roller coasters"),
    ("713210", "casino"),
    ("115112", "crop dusting"),
]


def command(*args: str) -> subprocess.CompletedProcess:
    """A naics-embedder command as a user runs it; its error line ends the benchmark."""
    done = subprocess.run(
        [sys.executable, "-m", "naics_mlflow", *args], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-checkpoint", required=True, metavar="REFERENCE")
    parser.add_argument("--config", default="conf/config.yaml")
    args = parser.parse_args()
    model = ["--from-checkpoint", args.from_checkpoint, "--config", args.config]
    with tempfile.TemporaryDirectory(prefix="everyday-") as folder:
        queries = Path(folder) / "everyday.csv"
        texts, found = Path(folder) / "texts.csv", Path(folder) / "found.csv"
        with queries.open("w", newline="") as file:
            csv.writer(file).writerows([("code", "text"), *DESCRIPTIONS])
        with texts.open("w", newline="") as file:
            csv.writer(file).writerows([("text",), *((text,) for _, text in DESCRIPTIONS)])
        report = json.loads(
            command("evaluate", *model, "--unseen-queries", str(queries), "--json").stdout
        )
        command("search", *model, "--input", str(texts), "--out", str(found))
        with found.open(newline="") as file:
            ranked = list(csv.DictReader(file))
    print(f"{len(DESCRIPTIONS)} everyday descriptions (logged to run {report['run_id']})")
    for system, values in report["retrieval"]["unseen"].items():
        print(
            f"{system:10s} top-1 {values['top1']:.4f}  top-5 {values['top5']:.4f}  "
            f"MRR {values['mrr']:.4f}"
        )
    print("\nnot first as search ranks (the right code's rank, then the first code):")
    for code, text in DESCRIPTIONS:
        matches = [row for row in ranked if row["text"] == text]
        if matches[0]["code"] != code:
            rank = next((row["rank"] for row in matches if row["code"] == code), ">5")
            print(f"  {text!r}: {code} at {rank}; first {matches[0]['code']} {matches[0]['title']}")


if __name__ == "__main__":
    main()
