#!/usr/bin/env python3
"""Generate the synthetic "Port Calloway Transit" rider-guide dataset (BEIR format).

A second, deliberately different dataset: the public transit rules of an
invented city (routes, stations, fares, rules of carriage, service changes).
Everything is fictional.  Compared with the demo dataset it has no train
split, and only about half of the documents carry a ``title``.

Output (relative to this file)::

    data/corpus.jsonl      {"_id", ["title"], "text", "metadata": {"category"}}
    data/queries.jsonl     {"_id", "text"}
    data/qrels/test.tsv    query-id<TAB>corpus-id<TAB>score

Deterministic (``random.Random(1234)``); standard library only.

Usage::

    python examples/other/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 1234
MIN_WORDS, MAX_WORDS = 40, 90

CITY = "Port Calloway"
AGENCY = "Port Calloway Transit"

PLACES = [
    "Veldt Square",
    "Lantern Quay",
    "Mossbank",
    "Orchard Rise",
    "Pellham Cross",
    "Grist Mill",
    "Tollgate",
    "Harrowmere",
    "Saltgate",
    "Copperleaf Heights",
    "Brine Street",
    "Weir End",
    "Fallowfield",
    "Kiln Lane",
    "Sparrow Hill",
    "Old Customs House",
    "Nettlebed",
    "Juniper Green",
    "Cable Point",
    "Marrow Docks",
    "Ashby Parade",
    "Thornbury Market",
    "Quayside North",
    "Gasworks",
    "Aldermoor",
    "Larkhill",
    "Dovecote",
    "Riverside Loop",
    "University Gate",
    "Calloway Central",
    "Fenwick Park",
    "Brackenhurst",
    "Ropewalk",
    "Signal Hill",
    "Tidewater",
    "Lowmarsh",
]

MODES = {
    # mode -> (vehicle word for queries, number range, depots)
    "bus": ("coach", (1, 99), ["Gasworks depot", "Aldermoor garage", "Lowmarsh yard"]),
    "tram": ("streetcar", (1, 19), ["Ropewalk tram shed", "Fenwick Park carbarn"]),
    "ferry": ("boat", (1, 9), ["Marrow Docks pier", "Lantern Quay slipway"]),
    "cable car": ("gondola", (1, 4), ["Signal Hill station house"]),
}
MODE_SYNONYM = {"bus": "coach", "tram": "streetcar", "ferry": "boat", "cable car": "gondola"}

FACILITIES = [
    "step-free lifts",
    "luggage lockers",
    "covered bike racks",
    "a staffed ticket window",
    "public toilets",
    "a lost property desk",
    "baby changing rooms",
    "a taxi rank",
    "real-time departure screens",
    "hearing loops at the counters",
]

RIDERS = [
    ("adult", "grown-up"),
    ("student", "college learner"),
    ("senior", "pensioner"),
    ("child", "kid"),
    ("disabled rider", "passenger with a disability"),
    ("visitor", "tourist"),
]
PRODUCTS = [
    ("single ticket", "one-way fare"),
    ("day pass", "24-hour ticket"),
    ("weekly pass", "seven-day ticket"),
    ("monthly pass", "30-day season ticket"),
    ("ferry supplement", "extra charge for the boat"),
    ("night fare", "late-evening ticket"),
]

CARRIAGE_TOPICS = [
    # (topic, doc rule, query phrasings)
    (
        "Pets",
        "small dogs and cats may travel in a closed carrier; larger dogs need a lead and a muzzle",
        ["can I bring my dog along", "rules for animals on board"],
    ),
    (
        "Bicycles",
        "full-size bicycles are carried outside the peak hours, at most {n} per vehicle",
        ["may I take a bike with me", "how many cycles fit per vehicle"],
    ),
    (
        "Strollers",
        "prams and buggies may stay unfolded in the marked bay, up to {n} at once",
        ["do I have to fold my baby buggy", "space for pushchairs"],
    ),
    (
        "Food and drink",
        "hot food is not allowed, and drinks must have a sealed lid",
        ["am I allowed to eat on board", "is snacking permitted"],
    ),
    (
        "Luggage",
        "bags larger than {n} centimeters on any side must go in the luggage rack",
        ["where do big suitcases go", "size limit for bags"],
    ),
    (
        "E-scooters",
        "folded electric scooters are allowed only if they weigh under {n} kilograms",
        ["can I carry my electric kick scooter", "rules for e-scooters"],
    ),
    (
        "Photography",
        "handheld photography is fine, but tripods and flash need a permit",
        ["can I take pictures on board", "is filming allowed"],
    ),
    (
        "Busking",
        "performing for money is banned on vehicles and permitted only in marked station pitches",
        ["can musicians play for tips", "street performers and the rules"],
    ),
    (
        "Lost property",
        "found items are kept for {n} days at the central lost property office",
        ["how long are forgotten belongings held", "I left something on board, how long will it be kept"],
    ),
    (
        "Refunds",
        "unused passes can be refunded within {n} days, minus a small handling fee",
        ["can I get my money back for a pass I did not use", "refund window for tickets"],
    ),
]

# numeric slot ranges for the rules that have one
CARRIAGE_LIMITS = {
    "Bicycles": (2, 6),
    "Strollers": (2, 4),
    "Luggage": (40, 90),
    "E-scooters": (12, 25),
    "Lost property": (14, 90),
    "Refunds": (7, 30),
}

ALERT_REASONS = [
    ("water main replacement", "pipe works"),
    ("a street festival", "a public celebration"),
    ("bridge resurfacing", "deck repairs on the bridge"),
    ("track renewal", "rail replacement"),
    ("pier maintenance", "dock repairs"),
    ("a charity marathon", "a running race"),
    ("sewer inspection", "drain surveys"),
    ("overhead line upgrades", "power cable works"),
]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

FILLERS = [
    "Timetables change twice a year, in spring and autumn.",
    "Staff in orange vests can answer questions on the spot.",
    "This guidance is published by the customer service office.",
    "The journey planner app reflects these rules within a day.",
    "Feedback can be left at any staffed ticket window.",
]


def words(s: str) -> int:
    return len(s.split())


def fix_articles(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[AEIOUaeiou])(?![Uu]ni|[Uu]se)", r"\1n ", text)


def assemble(rng: random.Random, lead, optional, fillers=FILLERS):
    target = rng.randint(48, 80)
    chosen = list(lead)
    total = sum(words(s) for _, s in chosen)
    opts = list(optional)
    rng.shuffle(opts)
    for key, sent in opts:
        if total >= target:
            break
        if total + words(sent) <= MAX_WORDS:
            chosen.append((key, sent))
            total += words(sent)
    fill = list(fillers)
    rng.shuffle(fill)
    while total < MIN_WORDS and fill:
        sent = fill.pop()
        chosen.append(("filler", sent))
        total += words(sent)
    text = fix_articles(" ".join(s for _, s in chosen))
    assert MIN_WORDS <= words(text) <= MAX_WORDS, text
    return text, [k for k, _ in chosen]


def clock(rng: random.Random, lo_h: int, hi_h: int) -> str:
    return f"{rng.randint(lo_h, hi_h):02d}:{rng.choice(range(0, 60, 5)):02d}"


class Corpus:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.docs: list[dict] = []
        self.facts: list[dict] = []

    def add(self, title: str, text: str, category: str, facts: dict) -> str:
        doc_id = f"t{len(self.docs) + 1:03d}"
        doc = {"_id": doc_id}
        if self.rng.random() < 0.5:  # about half the documents have a title
            doc["title"] = title
        doc["text"] = text
        doc["metadata"] = {"category": category}
        self.docs.append(doc)
        self.facts.append(dict(facts, category=category, doc=doc_id))
        return doc_id


def build(rng: random.Random) -> Corpus:
    corpus = Corpus(rng)

    # ---- routes (110) --------------------------------------------------------
    route_keys = []
    for mode, (_, (lo, hi), _) in MODES.items():
        route_keys += [(mode, n) for n in range(lo, hi + 1)]
    picked = sorted(rng.sample([k for k in route_keys if k[0] == "bus"], 80))
    picked += [k for k in route_keys if k[0] != "bus"][:30]  # 19 tram, 9 ferry, 2 cable car
    routes = []
    for mode, num in picked:
        a, b = rng.sample(PLACES, 2)
        routes.append(
            {
                "mode": mode,
                "num": num,
                "name": f"{mode} {num}",
                "a": a,
                "b": b,
                "first": clock(rng, 4, 7),
                "last": clock(rng, 21, 23),
                "peak": rng.choice([4, 5, 6, 8, 10, 12, 15]),
                "offpeak": rng.choice([15, 20, 30, 40, 60]),
                "depot": rng.choice(MODES[mode][2]),
                "night": rng.random() < 0.3,
                "stops": rng.randint(6, 48),
                "minutes": rng.randint(12, 75),
            }
        )
    for r in routes:
        name = r["name"].capitalize() if r["mode"] != "cable car" else "Cable car " + str(r["num"])
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"{name} runs between {r['a']} and {r['b']}, calling at {r['stops']} stops.",
                        f"{name} links {r['a']} with {r['b']} via {r['stops']} stops.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "hours",
                rng.choice(
                    [
                        f"The first departure is at {r['first']} and the last leaves at {r['last']}.",
                        f"Service starts at {r['first']}; final departures are at {r['last']}.",
                    ]
                ),
            ),
            (
                "frequency",
                rng.choice(
                    [
                        f"Vehicles come every {r['peak']} minutes at peak times and every {r['offpeak']} minutes otherwise.",
                        f"Headways are {r['peak']} minutes in the rush hours, {r['offpeak']} minutes off-peak.",
                    ]
                ),
            ),
            (
                "depot",
                rng.choice(
                    [
                        f"It operates out of {r['depot']}.",
                        f"Vehicles on this line are based at {r['depot']}.",
                    ]
                ),
            ),
            (
                "night",
                rng.choice(
                    [
                        "A reduced night service runs on Fridays and Saturdays."
                        if r["night"]
                        else "There is no night service on this line.",
                    ]
                ),
            ),
            (
                "duration",
                rng.choice(
                    [
                        f"An end-to-end trip takes about {r['minutes']} minutes.",
                        f"Allow {r['minutes']} minutes for the full run.",
                    ]
                ),
            ),
        ]
        text, keys = assemble(rng, lead, opt)
        r["doc"] = corpus.add(
            f"{name}: {r['a']} - {r['b']}", text, "route", {"kind": "route", "route": r, "keys": keys}
        )

    # ---- stations (70) -------------------------------------------------------
    station_places = rng.sample(PLACES, 30)
    stations = []
    for place in station_places:
        for kind in rng.sample(["interchange", "tram stop", "bus station", "ferry terminal"], 2):
            stations.append({"place": place, "kind": kind})
    stations = stations[:60]
    # Each route terminus is attached to exactly one station document: the one
    # of matching kind at that place, else the interchange there.  This keeps
    # "which lines end here" questions unambiguous.
    wanted = {"bus": "bus station", "tram": "tram stop", "ferry": "ferry terminal", "cable car": "interchange"}
    at_place: dict[str, dict[str, dict]] = {}
    for st in stations:
        at_place.setdefault(st["place"], {})[st["kind"]] = st
        st["serving"] = []
    for r in routes:
        for end in (r["a"], r["b"]):
            kinds = at_place.get(end, {})
            st = kinds.get(wanted[r["mode"]]) or kinds.get("interchange")
            if st is not None and r not in st["serving"]:
                st["serving"].append(r)
    for st in stations:
        st.update(
            {
                "facilities": rng.sample(FACILITIES, 3),
                "zone": rng.randint(1, 4),
                "exits": rng.randint(1, 6),
                "staffed": f"{clock(rng, 5, 8)} to {clock(rng, 19, 23)}",
            }
        )
        label = f"{st['place']} {st['kind']}"
        plural = "s" if st["exits"] > 1 else ""
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"{label} is in fare zone {st['zone']} and has {st['exits']} exit{plural}.",
                        f"The {label} sits in zone {st['zone']}, with {st['exits']} way{plural} out to the street.",
                    ]
                ),
            )
        ]
        fac = ", ".join(st["facilities"][:-1]) + " and " + st["facilities"][-1]
        opt = [
            (
                "facilities",
                rng.choice(
                    [
                        f"Facilities include {fac}.",
                        f"Passengers will find {fac} here.",
                    ]
                ),
            ),
            (
                "staffed",
                rng.choice(
                    [
                        f"Staff are on duty from {st['staffed']}.",
                        f"The help point is staffed {st['staffed']} daily.",
                    ]
                ),
            ),
            (
                "parking",
                rng.choice(
                    [
                        "There is no public car park; use the park-and-ride at Tollgate.",
                        "A small short-stay car park is available behind the main entrance.",
                    ]
                ),
            ),
        ]
        if st["serving"]:
            lines = ", ".join(r["name"] for r in st["serving"])
            opt.append(
                (
                    "lines",
                    rng.choice(
                        [
                            f"Lines serving it: {lines}.",
                            f"It is a terminus for {lines}.",
                        ]
                    ),
                )
            )
        text, keys = assemble(rng, lead, opt)
        corpus.add(f"{label} station guide", text, "station", {"kind": "station", "st": st, "keys": keys})

    # ---- fares (40) ----------------------------------------------------------
    combos = rng.sample([(r, p) for r in range(len(RIDERS)) for p in range(len(PRODUCTS))], 36)
    for ri, pi in sorted(combos):
        rider, product = RIDERS[ri], PRODUCTS[pi]
        f = {
            "rider": rider,
            "product": product,
            "price": f"{rng.randint(1, 90)}.{rng.choice(['00', '20', '50', '80'])}",
            "valid": rng.choice(["on all modes", "on buses and trams only", "everywhere except the cable car"]),
            "proof": rng.choice(["a valid photo card", "proof of age", "an enrolment letter", "no extra documents"]),
            "buy": rng.choice(["the mobile app", "ticket machines", "staffed windows", "on board from the driver"]),
        }
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"A {rider[0]} {product[0]} costs {f['price']} crowns.",
                        f"The {product[0]} for a {rider[0]} is priced at {f['price']} crowns.",
                    ]
                ),
            )
        ]
        opt = [
            ("valid", f"It is valid {f['valid']}."),
            (
                "proof",
                rng.choice([f"Inspectors may ask for {f['proof']}.", f"Riders must carry {f['proof']} when using it."]),
            ),
            ("buy", rng.choice([f"It can be bought via {f['buy']}.", f"Purchase it through {f['buy']}."])),
            ("capping", "Contactless fares are capped so you never pay more than a day pass."),
            (
                "transfer",
                rng.choice(
                    [
                        "Transfers within ninety minutes are free.",
                        "Changing vehicles within an hour and a half costs nothing extra.",
                    ]
                ),
            ),
        ]
        text, keys = assemble(rng, lead, opt)
        corpus.add(f"Fares: {rider[0]} {product[0]}", text, "fare", {"kind": "fare", "fare": f, "keys": keys})

    # ---- rules of carriage (40) ----------------------------------------------
    combos = sorted(rng.sample([(t, m) for t in range(len(CARRIAGE_TOPICS)) for m in range(len(MODES))], 40))
    modes = list(MODES)
    for ti, mi in combos:
        topic, rule, _ = CARRIAGE_TOPICS[ti]
        mode = modes[mi]
        lo, hi = CARRIAGE_LIMITS.get(topic, (0, 0))
        n = rng.randint(lo, hi)
        rule_text = rule.format(n=n)
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"On every {mode} in {CITY}, {rule_text}.",
                        f"{topic} rule for {mode} travel: {rule_text}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "staff",
                rng.choice(
                    [
                        "Drivers and crew have the final say if the vehicle is crowded.",
                        "Crew may refuse boarding when the vehicle is full.",
                    ]
                ),
            ),
            (
                "penalty",
                rng.choice(
                    [
                        f"Breaking this rule can lead to a penalty of {rng.choice([30, 50, 80, 120])} crowns.",
                        "Repeat offenders can be banned from the network for a month.",
                    ]
                ),
            ),
            (
                "exceptions",
                rng.choice(
                    [
                        "Assistance animals and mobility aids are always exempt.",
                        "Special arrangements for events can be requested a week ahead.",
                    ]
                ),
            ),
        ]
        text, keys = assemble(rng, lead, opt)
        corpus.add(
            f"Rules of carriage: {topic} ({mode})",
            text,
            "rule",
            {"kind": "rule", "topic": CARRIAGE_TOPICS[ti], "mode": mode, "keys": keys},
        )

    # ---- service changes (remaining docs, to 300) ----------------------------
    alert_ids = rng.sample(range(100, 999), 300 - len(corpus.docs))
    for aid in alert_ids:
        r = rng.choice(routes)
        reason = rng.choice(ALERT_REASONS)
        a = {
            "id": f"SC-{aid}",
            "route": r,
            "reason": reason,
            "month": rng.choice(MONTHS),
            "day": rng.randint(1, 28),
            "weeks": rng.randint(1, 8),
            "via": rng.choice([p for p in PLACES if p not in (r["a"], r["b"])]),
            "replacement": rng.random() < 0.4,
        }
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"Service change {a['id']}: from {a['day']} {a['month']}, {r['name']} is diverted via {a['via']} because of {reason[0]}.",
                        f"Because of {reason[0]}, {r['name']} will run via {a['via']} starting {a['day']} {a['month']} (notice {a['id']}).",
                    ]
                ),
            )
        ]
        opt = [
            (
                "length",
                rng.choice(
                    [
                        f"The diversion is expected to last {a['weeks']} week{'s' if a['weeks'] > 1 else ''}.",
                        f"Works are planned for {a['weeks']} week{'s' if a['weeks'] > 1 else ''}.",
                    ]
                ),
            ),
            (
                "replacement",
                "Replacement buses run every twenty minutes along the closed section."
                if a["replacement"]
                else "No replacement service is provided along the closed section.",
            ),
            (
                "stops",
                rng.choice(
                    [
                        "Temporary stops are marked with yellow flags.",
                        "Closed stops carry a notice showing the nearest open alternative.",
                    ]
                ),
            ),
            (
                "times",
                rng.choice(
                    [
                        "Journey times may increase by up to ten minutes.",
                        "Expect departures to run a few minutes behind the published timetable.",
                    ]
                ),
            ),
        ]
        text, keys = assemble(rng, lead, opt)
        corpus.add(f"Service change {a['id']}", text, "service-change", {"kind": "alert", "alert": a, "keys": keys})
    return corpus


def line_ref(rng: random.Random, r: dict) -> str:
    syn = MODE_SYNONYM[r["mode"]]
    return rng.choice(
        [f"the {r['num']} {syn}", f"{syn} line {r['num']}", f"the number {r['num']} {syn}", f"the {r['name']}"]
    )


def make_query(rng: random.Random, f: dict):
    keys = [k for k in f["keys"] if k not in ("intro", "filler")] + ["intro"]
    key = rng.choice(keys)
    kind = f["kind"]
    rel = [(f["doc"], 1)]
    if kind == "route":
        r = f["route"]
        ref = line_ref(rng, r)
        q = {
            "intro": [f"Where does {ref} go?", f"which neighbourhoods are the ends of {ref}"],
            "hours": [f"What time is the earliest and latest {ref}?", f"operating hours of {ref}"],
            "frequency": [f"How often does {ref} come by?", f"wait time between departures on {ref}"],
            "depot": [f"Which garage is {ref} run from?", f"home base of the vehicles on {ref}"],
            "night": [f"Is there late-night running on {ref}?", f"does {ref} operate after midnight at weekends"],
            "duration": [f"How long is the ride from end to end on {ref}?", f"total travel time on {ref}"],
        }[key]
    elif kind == "station":
        st = f["st"]
        ref = f"{st['place']} {st['kind']}"
        q = {
            "intro": [f"What fare zone is {ref} in?", f"how many ways out are there at {ref}"],
            "facilities": [f"What amenities are available at {ref}?", f"is there anywhere to leave bags at {ref}"],
            "staffed": [f"When is someone on duty at {ref}?", f"opening hours of the help desk at {ref}"],
            "parking": [f"Can I park my car at {ref}?", f"car parking options near {ref}"],
            "lines": [f"Which services start or end at {ref}?", f"lines terminating at {ref}"],
        }[key]
        if key == "lines":
            # The station page is the best answer; each listed route's own page
            # (which names this place as a terminus) is partially relevant.
            rel = [(f["doc"], 2)] + [(r["doc"], 1) for r in st["serving"]]
    elif kind == "fare":
        fa = f["fare"]
        who, what = fa["rider"][1], fa["product"][1]
        q = {
            "intro": [f"How much is a {what} for a {who}?", f"price of the {what} for a {who}"],
            "valid": [f"On which services can a {who} use the {what}?", f"where is the {who} {what} accepted"],
            "proof": [f"What ID does a {who} need for the {what}?", f"documents to show with a {who} {what}"],
            "buy": [f"Where can a {who} purchase a {what}?", f"how to get hold of a {what} as a {who}"],
            "capping": [f"Is there a daily price cap on the {who} {what}?"],
            "transfer": [f"Can a {who} switch vehicles on a {what} without paying again?"],
        }[key]
    elif kind == "rule":
        topic, _, phr = f["topic"]
        syn = MODE_SYNONYM[f["mode"]]
        q = {
            "intro": [f"On the {syn}, {rng.choice(phr)}?", f"{rng.choice(phr)} on a {syn}?"],
            "staff": [f"Can the crew turn me away on the {syn} over {topic.lower()}?"],
            "penalty": [f"What is the fine for breaking the {topic.lower()} rule on the {syn}?"],
            "exceptions": [f"Are there exemptions to the {syn} {topic.lower()} rule?"],
        }[key]
    elif kind == "alert":
        a = f["alert"]
        r = a["route"]
        ref = rng.choice(
            [
                f"the {a['reason'][1]} diversion on {line_ref(rng, r)}",
                f"{line_ref(rng, r)} rerouting past {a['via']}",
                a["id"],
            ]
        )
        q = {
            "intro": [f"Why is {line_ref(rng, r)} going via {a['via']}?", f"details of {ref}"],
            "length": [f"How many weeks will {ref} last?", f"end date for {ref}"],
            "replacement": [f"Is there a substitute shuttle during {ref}?"],
            "stops": [f"Where are the temporary stops for {ref}?"],
            "times": [f"Will {ref} make my trip slower?"],
        }[key]
    else:
        raise ValueError(kind)
    text = fix_articles(rng.choice(q))
    return text[0].upper() + text[1:], rel


TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def ngrams(s: str, n: int) -> set:
    t = TOKEN_RE.findall(s.lower())
    return {tuple(t[i : i + n]) for i in range(len(t) - n + 1)}


def is_paraphrase(query: str, doc_text: str, max_shared: int = 6) -> bool:
    return query.lower() not in doc_text.lower() and not (ngrams(query, max_shared) & ngrams(doc_text, max_shared))


def build_queries(rng: random.Random, corpus: Corpus, n: int):
    text_by_id = {d["_id"]: d["text"] for d in corpus.docs}
    targets = rng.sample(range(len(corpus.docs)), n)
    queries, rels, seen = [], [], set()
    for di in targets:
        for _ in range(50):
            qtext, rel = make_query(rng, corpus.facts[di])
            if qtext not in seen and all(is_paraphrase(qtext, text_by_id[d]) for d, _ in rel):
                break
        assert qtext not in seen, qtext
        for d, _ in rel:
            assert is_paraphrase(qtext, text_by_id[d]), (qtext, text_by_id[d])
        seen.add(qtext)
        qid = f"tq{len(queries) + 1:03d}"
        queries.append({"_id": qid, "text": qtext})
        rels.append((qid, rel))
    return queries, rels


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = ap.parse_args(argv)

    rng = random.Random(SEED)
    corpus = build(rng)
    assert len({d["_id"] for d in corpus.docs}) == len(corpus.docs) == 300
    queries, rels = build_queries(rng, corpus, 100)

    out: Path = args.out
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", corpus.docs)
    write_jsonl(out / "queries.jsonl", queries)
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8", newline="\n") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, pairs in rels:
            for doc_id, score in pairs:
                fh.write(f"{qid}\t{doc_id}\t{score}\n")
    print(f"wrote {len(corpus.docs)} docs, {len(queries)} queries to {out}")


if __name__ == "__main__":
    main()
