#!/usr/bin/env python3
"""Generate the synthetic "Northwind Orbital" handbook dataset in BEIR format.

Everything here is invented: Northwind Orbital, its sites, teams, parts,
vendors and people are fictional.  The text is assembled from templates with
many slots so that documents are distinguishable yet share vocabulary (several
documents mention the same component, site or team), which keeps retrieval
non-trivial.

Output (relative to this file)::

    data/corpus.jsonl      {"_id", "title", "text", "metadata": {"category"}}
    data/queries.jsonl     {"_id", "text"}
    data/qrels/test.tsv    query-id<TAB>corpus-id<TAB>score
    data/qrels/train.tsv

The generator is deterministic (``random.Random(1234)``, no dependence on
hashing, time or the environment): running it twice yields byte-identical
files.  Standard library only.

Usage::

    python examples/demo/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 1234

# --------------------------------------------------------------------------
# Vocabulary (all invented)
# --------------------------------------------------------------------------

CODENAMES = [
    "Halcyon",
    "Meridian",
    "Corvid",
    "Tamarack",
    "Quillon",
    "Bramble",
    "Sextant",
    "Ostrava",
    "Juniper",
    "Kessel",
    "Lumen",
    "Parallax",
    "Wicket",
    "Zephyr",
    "Cobalt",
    "Fennec",
    "Gantry",
    "Heron",
    "Isotope",
    "Jasper",
    "Kiln",
    "Larkspur",
    "Marlin",
    "Nimbus",
    "Onyx",
    "Pylon",
    "Quasar",
    "Rook",
    "Sorrel",
    "Tundra",
    "Umber",
    "Vesper",
    "Wren",
    "Yarrow",
    "Zircon",
    "Anvil",
    "Basalt",
    "Cinder",
    "Drover",
    "Ember",
    "Falcate",
    "Glimmer",
    "Hollis",
    "Ironbark",
    "Jetty",
    "Kittering",
    "Lodestar",
    "Mistral",
]

# type -> alias used in queries, function phrase, spec
#   spec = (doc label, query label, unit, lo, hi, step)
COMPONENT_TYPES = {
    "coolant pump": (
        "pump",
        "circulates glycol coolant around the {sub}",
        ("rated flow", "coolant throughput", "liters per minute", 20, 90, 1),
    ),
    "thermal relay": (
        "relay",
        "cuts power to the {sub} when temperatures run away",
        ("trip temperature", "cutoff point", "degrees Celsius", 60, 120, 1),
    ),
    "star tracker": (
        "tracker",
        "provides attitude fixes for the {sub}",
        ("pointing accuracy", "attitude precision", "arcseconds", 2, 30, 1),
    ),
    "reaction wheel": (
        "wheel",
        "stores momentum for the {sub}",
        ("maximum speed", "top rotation rate", "rpm", 3000, 9000, 100),
    ),
    "battery module": (
        "battery",
        "buffers energy for the {sub} during eclipse",
        ("usable capacity", "energy storage", "amp-hours", 20, 160, 2),
    ),
    "power distribution unit": (
        "PDU",
        "switches and fuses the supply rails feeding the {sub}",
        ("output rating", "power budget", "watts", 400, 3000, 50),
    ),
    "telemetry transceiver": (
        "radio",
        "carries housekeeping data from the {sub} to the ground",
        ("downlink rate", "data throughput", "megabits per second", 2, 300, 2),
    ),
    "gimbal actuator": (
        "actuator",
        "steers the engine nozzle mounted on the {sub}",
        ("slew rate", "swivel speed", "degrees per second", 1, 20, 1),
    ),
    "propellant valve": (
        "valve",
        "meters propellant flow in the {sub}",
        ("operating pressure", "pressure ceiling", "bar", 10, 300, 5),
    ),
    "solar array drive": (
        "array drive",
        "points the solar panels that feed the {sub}",
        ("step resolution", "angular increment", "millidegrees", 5, 90, 1),
    ),
    "flight computer": (
        "onboard computer",
        "runs the control software for the {sub}",
        ("working memory", "RAM size", "gigabytes", 2, 64, 2),
    ),
    "sensor harness": (
        "harness",
        "routes sensor signals out of the {sub}",
        ("conductor count", "number of wires", "conductors", 12, 96, 4),
    ),
    "thruster controller": (
        "thruster driver",
        "fires the small thrusters of the {sub}",
        ("valve response time", "reaction latency", "milliseconds", 2, 40, 1),
    ),
    "pressure regulator": (
        "regulator",
        "holds tank pressure steady for the {sub}",
        ("output setpoint", "regulated pressure", "kilopascals", 100, 900, 10),
    ),
    "ground antenna": (
        "dish",
        "tracks passing vehicles on behalf of the {sub}",
        ("dish diameter", "reflector size", "meters", 2, 18, 1),
    ),
    "torque rod": (
        "magnetorquer",
        "dumps excess momentum from the {sub}",
        ("magnetic dipole", "dipole strength", "amp-square-meters", 5, 400, 5),
    ),
    "heater panel": (
        "heater",
        "keeps the {sub} above its survival temperature",
        ("heating power", "wattage", "watts", 5, 250, 5),
    ),
    "data recorder": (
        "recorder",
        "buffers science and engineering data from the {sub}",
        ("storage capacity", "how much data it can hold", "terabytes", 1, 32, 1),
    ),
    "umbilical connector": (
        "umbilical plug",
        "mates the vehicle to ground support equipment at the {sub}",
        ("mating cycle limit", "connect-disconnect lifetime", "cycles", 200, 5000, 100),
    ),
    "inertial measurement unit": (
        "IMU",
        "senses rotation and acceleration for the {sub}",
        ("bias stability", "gyro drift", "millidegrees per hour", 3, 90, 1),
    ),
}

# type -> (capability tags, plausible host subsystems).  Tags gate which error
# kinds, procedures and failure symptoms make sense for a component.
COMPONENT_TRAITS = {
    "coolant pump": ({"motor", "fluid"}, ["thermal control loop", "avionics bay", "payload deck"]),
    "thermal relay": (set(), ["avionics bay", "power subsystem", "payload deck"]),
    "star tracker": ({"digital"}, ["attitude control subsystem", "payload deck"]),
    "reaction wheel": ({"motor", "digital"}, ["attitude control subsystem"]),
    "battery module": ({"digital"}, ["power subsystem"]),
    "power distribution unit": ({"digital"}, ["power subsystem", "avionics bay", "static test stand"]),
    "telemetry transceiver": ({"digital"}, ["communications stack", "avionics bay"]),
    "gimbal actuator": ({"motor"}, ["propulsion module", "static test stand"]),
    "propellant valve": ({"fluid"}, ["propulsion module", "static test stand"]),
    "solar array drive": ({"motor"}, ["power subsystem"]),
    "flight computer": ({"digital"}, ["avionics bay", "attitude control subsystem", "propulsion module"]),
    "sensor harness": (set(), ["propulsion module", "payload deck", "static test stand", "thermal control loop"]),
    "thruster controller": ({"digital"}, ["attitude control subsystem", "propulsion module"]),
    "pressure regulator": ({"fluid"}, ["propulsion module", "static test stand", "thermal control loop"]),
    "ground antenna": ({"motor", "digital"}, ["ground segment"]),
    "torque rod": (set(), ["attitude control subsystem"]),
    "heater panel": (set(), ["thermal control loop", "propulsion module", "payload deck"]),
    "data recorder": ({"digital"}, ["avionics bay", "payload deck", "ground segment"]),
    "umbilical connector": ({"fluid"}, ["launch umbilical tower", "static test stand"]),
    "inertial measurement unit": ({"digital"}, ["attitude control subsystem", "avionics bay"]),
}

VENDORS = [
    "Brightwater Dynamics",
    "Calder & Finch Instruments",
    "Pellucid Aerospace",
    "Harrowgate Precision",
    "Tinmouth Electronics",
    "Ventral Systems",
    "Oakhollow Fabrication",
    "Saltire Components",
    "Quorra Motion",
    "Ashgrove Thermal",
    "Redfern Optics",
    "Gallowmere Power",
]

# (symptom, required tag or None)
SYMPTOMS = [
    ("a slow climb in housing temperature", None),
    ("intermittent dropouts in its status telemetry", "digital"),
    ("a faint grinding noise under load", "motor"),
    ("readings that wander by a few percent between power cycles", None),
    ("a rising current draw at idle", None),
    ("brief brownouts on the adjacent bus", None),
    ("visible discoloration around the mounting flange", None),
    ("self-test passes that take noticeably longer than usual", "digital"),
    ("checksum warnings in the boot log", "digital"),
    ("a hiss or pressure decay after shutdown", "fluid"),
    ("bearing chatter when it spins up", "motor"),
]

SITES = [
    ("Ridgeback Station", "Ridgeback"),
    ("Saltmarsh Yard", "Saltmarsh"),
    ("Cedar Flats Test Range", "Cedar Flats"),
    ("Harbor Nine", "Harbor Nine"),
    ("Mesa Alta Campus", "Mesa Alta"),
    ("Kettle Point Ground Station", "Kettle Point"),
    ("Loch Tarran Facility", "Loch Tarran"),
    ("Brightwell Annex", "Brightwell"),
    ("Gull Island Launch Complex", "Gull Island"),
    ("Ferngate Integration Hall", "Ferngate"),
    ("Coldwater Depot", "Coldwater"),
    ("Sable Ridge Observatory", "Sable Ridge"),
    ("Pinecross Works", "Pinecross"),
    ("Dunmore Flight Operations Center", "Dunmore"),
    ("Thistle Bay Range", "Thistle Bay"),
    ("Ironvale Plant", "Ironvale"),
    ("Westmarch Laboratory", "Westmarch"),
    ("Quarry Hill Yard", "Quarry Hill"),
    ("Larchmont Office", "Larchmont"),
    ("Stonebrook Clean Facility", "Stonebrook"),
    ("Amberline Hub", "Amberline"),
    ("Northcape Tracking Site", "Northcape"),
    ("Redwater Logistics Center", "Redwater"),
    ("Vantage Row Offices", "Vantage Row"),
]

REGIONS = [
    "the Tarran Highlands",
    "the Saltire coast",
    "the Ember Valley",
    "the northern plateau",
    "the Greyhollow basin",
    "the Calder lowlands",
]

FIRST_NAMES = [
    "Amara",
    "Bastian",
    "Celine",
    "Dario",
    "Elif",
    "Farouk",
    "Greta",
    "Hiro",
    "Ines",
    "Jonah",
    "Kaia",
    "Lorcan",
    "Mirela",
    "Nikhil",
    "Odette",
    "Pavel",
    "Quinn",
    "Rosalind",
    "Soren",
    "Tamsin",
    "Umar",
    "Valeria",
    "Wendell",
    "Ximena",
    "Yusuf",
    "Zofia",
    "Anselm",
    "Brigid",
    "Cosmin",
    "Delphine",
]
LAST_NAMES = [
    "Achterberg",
    "Blackwood",
    "Castellano",
    "Drummond",
    "Eklund",
    "Fairbairn",
    "Grigorescu",
    "Halloran",
    "Ivanova",
    "Jablonski",
    "Kowalczyk",
    "Lindqvist",
    "Moreau",
    "Nakashima",
    "Okonkwo",
    "Pemberton",
    "Quaresma",
    "Rasmussen",
    "Szabo",
    "Thorvaldsen",
    "Umarova",
    "Vasquez",
    "Whitlock",
    "Yilmaz",
]

ANIMALS = [
    "Kestrel",
    "Osprey",
    "Lynx",
    "Marten",
    "Ibis",
    "Heron",
    "Otter",
    "Puffin",
    "Caracal",
    "Badger",
    "Plover",
    "Stoat",
    "Bittern",
    "Condor",
    "Dingo",
    "Egret",
    "Gannet",
    "Jackal",
    "Kinkajou",
    "Lemur",
    "Magpie",
    "Narwhal",
    "Ocelot",
    "Pika",
    "Quokka",
    "Raven",
    "Shrike",
    "Tapir",
    "Vole",
    "Wombat",
    "Avocet",
    "Bobcat",
    "Curlew",
    "Dunlin",
    "Ermine",
    "Falcon",
]
TEAM_FUNCTIONS = [
    ("Avionics", "designs and qualifies flight electronics"),
    ("Propulsion Test", "runs hot-fire campaigns on the static stands"),
    ("Thermal", "models and verifies heat rejection hardware"),
    ("Ground Systems", "operates antennas and mission control software"),
    ("Integration", "assembles vehicles and runs end-to-end checkouts"),
    ("Reliability", "tracks failure data and drives corrective actions"),
    ("Power", "builds batteries, harnesses and power electronics"),
    ("Flight Software", "writes and releases onboard control code"),
    ("Site Operations", "keeps buildings, utilities and logistics running"),
    ("Quality", "audits workmanship and releases hardware for flight"),
    ("Guidance", "owns attitude determination and control algorithms"),
    ("Launch Support", "prepares pads, umbilicals and countdown procedures"),
]

SEVERITIES = [
    ("1", "the highest tier, meaning flight-critical"),
    ("2", "a major tier that blocks testing"),
    ("3", "a moderate tier that can wait for the next shift"),
    ("4", "an advisory tier that only needs logging"),
]

# (mnemonic, doc meaning phrase, required tag or None)
ERROR_KINDS = [
    ("OVERTEMP", "its housing temperature exceeds the configured limit", None),
    ("UNDERVOLT", "the supply voltage sags below the brownout threshold", None),
    ("COMM_TIMEOUT", "it stops answering polls on the data bus", "digital"),
    ("CHECKSUM_FAIL", "a configuration block fails its integrity check", "digital"),
    ("STALL", "the motor draws current without turning", "motor"),
    ("DRIFT", "its output wanders outside the calibration band", None),
    ("LEAK", "pressure decays faster than the leak budget allows", "fluid"),
    ("OVERCURRENT", "a rail draws more current than its fuse rating", None),
    ("SENSOR_OPEN", "one of its sense lines reads as an open circuit", None),
    ("CAL_STALE", "the stored calibration is older than permitted", None),
    ("WATCHDOG", "the internal watchdog forces a reset", "digital"),
    ("PRESSURE_HIGH", "pressure climbs above the relief setting", "fluid"),
    ("VIBRATION", "accelerometers register vibration above the limit", None),
    ("FW_MISMATCH", "the firmware build does not match the approved baseline", "digital"),
    ("BUS_FAULT", "the bus controller flags a framing error", "digital"),
]

FIRST_ACTIONS = [
    "power-cycle the unit from the console and watch whether the code returns",
    "reseat the main connector after confirming the rail is de-energized",
    "check the supply voltage at the test point with a calibrated meter",
    "clear the fault latch and capture a snapshot of the housekeeping frame",
    "compare the live reading against the redundant channel",
    "pull the last hour of logs and attach them to a new ticket",
]

FALSE_ALARMS = [
    "cold starts below freezing",
    "firmware uploads",
    "ground loop testing",
    "thermal vacuum ramps",
    "antenna handovers",
    "load bank switching",
]

ACTIONS = [
    # (doc infinitive, doc noun phrase for titles, query infinitive paraphrase,
    #  required tag or None)
    ("recalibrate", "Recalibration", "re-zero", None),
    ("replace", "Replacement", "swap out", None),
    ("inspect", "Inspection", "examine", None),
    ("flush", "Flushing", "purge", "fluid"),
    ("update the firmware on", "Firmware update", "flash new software onto", "digital"),
    ("leak test", "Leak testing", "check for leaks on", "fluid"),
    ("install", "Installation", "fit", None),
    ("decommission", "Decommissioning", "retire", None),
    ("bench test", "Bench testing", "run shop checks on", None),
    ("clean", "Cleaning", "wipe down", None),
    ("lubricate", "Lubrication", "grease", "motor"),
]


def fits(tag: str | None, comp: dict) -> bool:
    return tag is None or tag in comp["tags"]


TOOLS = [
    "torque kit TK-4",
    "the portable calibration rack",
    "an ESD-safe tool roll",
    "a helium leak detector",
    "the flight-line laptop with the service image",
    "a breakout box",
    "a borescope",
    "lint-free wipes and isopropyl alcohol",
    "a calibrated multimeter",
    "the lifting fixture LF-2",
]
PREREQS = [
    "lock out and tag out the supply rails",
    "vent the line to ambient pressure",
    "obtain a permit from the shift supervisor",
    "let the unit cool for at least thirty minutes",
    "ground yourself and the work surface",
    "download and archive the current configuration",
]
SIGNOFF_ROLES = [
    "the duty quality inspector",
    "the shift lead",
    "the responsible engineer",
    "the site safety officer",
    "a second certified technician",
]

POLICY_TOPICS = [
    # (name, doc rule template, value lo, hi, step, query phrasings)
    (
        "Remote Access Policy",
        "VPN sessions are disconnected after {n} minutes without activity",
        10,
        60,
        5,
        [
            "how long can a VPN connection sit idle before it gets dropped",
            "after how many idle minutes does the tunnel kick me off",
        ],
    ),
    (
        "Badge Access Policy",
        "a lost or stolen badge must be reported within {n} hours",
        2,
        24,
        2,
        [
            "how quickly do I have to tell someone my ID card went missing",
            "what is the deadline for flagging a misplaced access card",
        ],
    ),
    (
        "Travel Reimbursement Policy",
        "expense claims must be filed no later than {n} days after the trip ends",
        10,
        60,
        5,
        [
            "what is the cutoff for submitting trip costs once I'm back",
            "how long do I have to claim money spent while traveling",
        ],
    ),
    (
        "On-Call Compensation Policy",
        "staff receive {n} credits for every weekend spent carrying the pager",
        100,
        600,
        50,
        [
            "how much extra do people earn for a weekend pager shift",
            "what is the payment for being on standby over Saturday and Sunday",
        ],
    ),
    (
        "Change Freeze Policy",
        "no production changes may be deployed in the {n} days before a launch window",
        2,
        14,
        1,
        ["how far ahead of a launch are deployments blocked", "when does the pre-launch lockout on releases begin"],
    ),
    (
        "Visitor Escort Policy",
        "each host may escort at most {n} guests at a time",
        2,
        8,
        1,
        ["how many outside people can one employee bring in together", "what is the cap on guests per sponsor"],
    ),
    (
        "Hardware Disposal Policy",
        "destruction certificates for wiped drives are kept for {n} months",
        6,
        60,
        6,
        [
            "how long do we hold on to the paperwork proving old disks were shredded",
            "what is the retention period for drive destruction records",
        ],
    ),
    (
        "Data Retention Policy",
        "raw telemetry archives are retained for {n} days before deletion",
        30,
        720,
        30,
        ["how long is raw flight data stored before it is purged", "when do old telemetry archives get erased"],
    ),
    (
        "Cleanroom Gowning Policy",
        "gowns must be changed every {n} hours inside the controlled area",
        2,
        8,
        1,
        [
            "how often should cleanroom suits be swapped for fresh ones",
            "what is the maximum time one bunny suit may be worn",
        ],
    ),
    (
        "Hazardous Materials Policy",
        "no more than {n} liters of propellant may be stored outside the bunker",
        5,
        80,
        5,
        [
            "what is the largest amount of fuel allowed outside the bunker",
            "how much propellant can be kept outside the bunker",
        ],
    ),
    (
        "Overtime Policy",
        "working more than {n} extra hours in a week requires director approval",
        4,
        20,
        2,
        [
            "what is the weekly limit on extra hours before a director has to sign off",
            "how many additional hours can I put in per week without special permission",
        ],
    ),
    (
        "Laptop Encryption Policy",
        "disk encryption passphrases must be at least {n} characters long",
        12,
        32,
        2,
        [
            "what is the minimum length for a disk password on company notebooks",
            "how long must the full-disk encryption secret be",
        ],
    ),
    (
        "Incident Reporting Policy",
        "a severity-one event must be declared within {n} minutes of detection",
        5,
        30,
        5,
        [
            "how fast must a major outage be officially raised",
            "what is the time limit for declaring a top-priority problem",
        ],
    ),
    (
        "Vendor Onboarding Policy",
        "the supplier security review takes up to {n} business days",
        5,
        30,
        5,
        [
            "how long does vetting a new supplier usually take",
            "what turnaround should I expect for approving a new vendor",
        ],
    ),
    (
        "Tool Calibration Policy",
        "torque wrenches are recertified every {n} days",
        30,
        365,
        15,
        ["how often do torque tools need to be re-certified", "what is the recertification cycle for wrenches"],
    ),
    (
        "Vehicle Safety Policy",
        "the speed limit on internal roads is {n} kilometers per hour",
        10,
        40,
        5,
        ["how fast am I allowed to drive inside the grounds", "what is the maximum driving speed on site lanes"],
    ),
]

APPROVERS = [
    "the site director",
    "the security office",
    "the finance controller",
    "the chief engineer",
    "the people operations lead",
    "the safety committee",
]

BUILDING_FUNCTIONS = [
    ("the cleanroom used for final vehicle assembly", "final assembly cleanroom"),
    ("machine shops and a heat-treatment furnace", "machining workshop"),
    ("the mission control floor and its backup consoles", "control room"),
    ("receiving docks and the bonded parts store", "warehouse"),
    ("environmental chambers for thermal vacuum testing", "thermal vacuum chamber"),
    ("offices for engineering and program staff", "desks for engineers"),
    ("the battery conditioning lab", "battery lab"),
    ("the propellant loading cart garage", "fuel cart garage"),
    ("a vibration table and acoustic test cell", "shaker table"),
    ("the canteen, first aid room and training rooms", "cafeteria"),
]
ACCESS_HOURS = [
    "around the clock for badged staff",
    "from 06:00 to 22:00 on weekdays",
    "from 07:00 to 19:00, weekends by request",
    "only during scheduled test campaigns",
]

ROOT_CAUSES = [
    "a corroded grounding strap that raised noise on the bus",
    "a firmware regression introduced in the previous release",
    "a connector that had been mated beyond its rated cycle count",
    "a mislabeled harness installed during the last rework",
    "coolant contaminated with particulate from a new filter batch",
    "a calibration file copied from the wrong serial number",
    "thermal paste that had dried out after repeated cycling",
    "an undersized fuse fitted as a temporary substitution",
    "a loose fastener that let the mount resonate",
    "a scheduler bug that starved the telemetry task",
]
IMPACTS = [
    "a test campaign slipped by two days",
    "one ground pass of telemetry was lost",
    "a customer rehearsal was postponed",
    "no external impact, but a spare unit was consumed",
    "the static fire was scrubbed and rescheduled",
    "a shipment to the launch site was held for inspection",
]
FOLLOWUPS = [
    "adding the check to the pre-shift walkdown",
    "updating the drawing and re-inspecting the fleet",
    "adding an automated regression test",
    "tightening the receiving inspection criteria",
    "training every shift on the revised procedure",
    "replacing the supplier lot across all spares",
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

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

MIN_WORDS, MAX_WORDS = 40, 90


def fmt_num(n: int) -> str:
    return f"{n:,}"


def pick_value(rng: random.Random, lo: int, hi: int, step: int) -> int:
    return rng.randrange(lo, hi + 1, step)


def words(s: str) -> int:
    return len(s.split())


def assemble(
    rng: random.Random, lead: list[tuple[str, str]], optional: list[tuple[str, str]], fillers: list[str]
) -> tuple[str, list[str]]:
    """Join sentences into a 40-90 word text; return (text, included fact keys).

    ``lead`` sentences are always kept (in order); ``optional`` ones are
    shuffled and added while they fit a randomly drawn target length.
    """
    target = rng.randint(52, 84)
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
    n = words(text)
    assert MIN_WORDS <= n <= MAX_WORDS, (n, text)
    return text, [k for k, _ in chosen]


GENERIC_FILLERS = [
    "Corrections to this entry go through the handbook editors.",
    "This page is reviewed at least once per quarter.",
    "Older revisions remain available in the document archive.",
    "Local practice may add steps but never remove them.",
    "Ask in the handbook channel if anything here looks outdated.",
]


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


class Corpus:
    def __init__(self) -> None:
        self.docs: list[dict] = []
        self.facts: list[dict] = []  # parallel to docs: info used to build queries

    def add(self, title: str, text: str, category: str, facts: dict) -> str:
        doc_id = f"d{len(self.docs) + 1:04d}"
        self.docs.append({"_id": doc_id, "title": title, "text": text, "metadata": {"category": category}})
        facts = dict(facts)
        facts["category"] = category
        self.facts.append(facts)
        return doc_id


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def build(rng: random.Random):
    corpus = Corpus()

    # ---- teams (built first so components can reference owners) -----------
    teams = []
    seen = set()
    while len(teams) < 100:
        animal = rng.choice(ANIMALS)
        func, mission = rng.choice(TEAM_FUNCTIONS)
        name = f"{animal} {func}"
        if name in seen:
            continue
        seen.add(name)
        teams.append(
            {
                "name": name,
                "mission": mission,
                "lead": person(rng),
                "site": rng.choice(SITES),
                "headcount": rng.randint(4, 38),
                "channel": "#" + name.lower().replace(" ", "-"),
                "rotation": rng.choice(["weekly", "fortnightly", "follow-the-sun", "per test campaign"]),
                "components": [],
            }
        )

    # ---- components --------------------------------------------------------
    comp_types = list(COMPONENT_TYPES)
    components = []
    seen = set()
    part_numbers = rng.sample(range(1000, 9999), 260)
    while len(components) < 260:
        code = rng.choice(CODENAMES)
        ctype = rng.choice(comp_types)
        if (code, ctype) in seen:
            continue
        seen.add((code, ctype))
        alias, func, spec = COMPONENT_TYPES[ctype]
        tags, subs = COMPONENT_TRAITS[ctype]
        owner = rng.choice([t for t in teams if len(t["components"]) < 4])
        comp = {
            "code": code,
            "type": ctype,
            "alias": alias,
            "tags": tags,
            "name": f"{code} {ctype}",
            "part": f"NW-{part_numbers[len(components)]}",
            "sub": rng.choice(subs),
            "site": rng.choice(SITES),
            "vendor": rng.choice(VENDORS),
            "owner": owner,
            "spec": spec,
            "spec_val": pick_value(rng, *spec[3:]),
            "interval": rng.choice([250, 500, 750, 1000, 1500, 2000, 3000]),
            "symptom": None,
            "func": func,
            "errors": [],
            "procedures": [],
        }
        comp["symptom"] = rng.choice([sy for sy, tag in SYMPTOMS if fits(tag, comp)])
        owner["components"].append(comp)
        components.append(comp)

    for c in components:
        spec_label, _, unit, *_ = c["spec"]
        func = c["func"].format(sub=c["sub"])
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"The {c['name']} (part {c['part']}) {func}.",
                        f"Part {c['part']}, known internally as the {c['name']}, {func}.",
                        f"Our {c['name']}, catalogued as {c['part']}, {func}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "spec",
                rng.choice(
                    [
                        f"Its {spec_label} is {fmt_num(c['spec_val'])} {unit}.",
                        f"The datasheet lists a {spec_label} of {fmt_num(c['spec_val'])} {unit}.",
                        f"Engineering signs off units with a {spec_label} of {fmt_num(c['spec_val'])} {unit}.",
                    ]
                ),
            ),
            (
                "interval",
                rng.choice(
                    [
                        f"Inspect it every {fmt_num(c['interval'])} operating hours.",
                        f"Scheduled maintenance falls due after {fmt_num(c['interval'])} hours of runtime.",
                        f"The maintenance plan calls for a check every {fmt_num(c['interval'])} hours on power.",
                    ]
                ),
            ),
            (
                "vendor",
                rng.choice(
                    [
                        f"It is sourced from {c['vendor']}.",
                        f"The only approved supplier is {c['vendor']}.",
                        f"Purchasing orders it from {c['vendor']} under a framework contract.",
                    ]
                ),
            ),
            (
                "owner",
                rng.choice(
                    [
                        f"The {c['owner']['name']} team owns the part and signs off on replacements.",
                        f"Design authority sits with the {c['owner']['name']} team.",
                        f"Questions about it go to {c['owner']['name']}, the owning team.",
                    ]
                ),
            ),
            (
                "location",
                rng.choice(
                    [
                        f"Most installed units are in vehicles integrated at {c['site'][0]}.",
                        f"The reference unit lives at {c['site'][0]} for comparison testing.",
                    ]
                ),
            ),
            (
                "symptom",
                rng.choice(
                    [
                        f"A failing unit typically shows {c['symptom']}.",
                        f"Technicians report that degradation usually starts with {c['symptom']}.",
                        f"Early signs of wear include {c['symptom']}.",
                    ]
                ),
            ),
        ]
        fill = GENERIC_FILLERS + [
            f"Spares for the {c['alias']} are held in the bonded store.",
            f"Never operate the {c['alias']} outside its qualified envelope.",
        ]
        text, keys = assemble(rng, lead, opt, fill)
        c["keys"] = keys
        c["doc"] = corpus.add(
            f"{c['name']} ({c['part']})", text, "component", {"kind": "component", "comp": c, "keys": keys}
        )

    # ---- procedures --------------------------------------------------------
    procedures = []
    seen = set()
    proc_numbers = rng.sample(range(100, 999), 200)
    while len(procedures) < 200:
        comp = rng.choice(components)
        act = rng.choice([a for a in ACTIONS if fits(a[3], comp)])
        if (comp["name"], act[0]) in seen:
            continue
        seen.add((comp["name"], act[0]))
        p = {
            "id": f"P-{proc_numbers[len(procedures)]}",
            "comp": comp,
            "act": act,
            "minutes": rng.choice([20, 30, 45, 60, 90, 120, 180, 240]),
            "staff": rng.randint(1, 4),
            "tool": rng.choice(TOOLS),
            "prereq": rng.choice(PREREQS),
            "signoff": rng.choice(SIGNOFF_ROLES),
            "site": rng.choice(SITES),
        }
        comp["procedures"].append(p)
        procedures.append(p)

    for p in procedures:
        c = p["comp"]
        verb, noun, _, _ = p["act"]
        hours = p["minutes"] / 60
        dur = (
            f"{p['minutes']} minutes"
            if p["minutes"] < 60
            else (f"{int(hours)} hour" + ("s" if hours >= 2 else "") if hours == int(hours) else f"{hours:g} hours")
        )
        staff = {1: "one technician", 2: "two technicians", 3: "three technicians", 4: "four technicians"}[p["staff"]]
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"Procedure {p['id']} explains how to {verb} the {c['name']} ({c['part']}).",
                        f"Work instruction {p['id']} covers the steps to {verb} the {c['name']}.",
                        f"Use procedure {p['id']} whenever you need to {verb} a {c['name']}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "duration",
                rng.choice(
                    [
                        f"Allow roughly {dur} for the whole job.",
                        f"The task normally takes {dur} end to end.",
                    ]
                ),
            ),
            (
                "staff",
                rng.choice(
                    [
                        f"It needs {staff} on the floor.",
                        f"Plan for {staff}; fewer is not permitted.",
                    ]
                ),
            ),
            (
                "tool",
                rng.choice(
                    [
                        f"Bring {p['tool']} before starting.",
                        f"The required kit is {p['tool']}.",
                    ]
                ),
            ),
            (
                "prereq",
                rng.choice(
                    [
                        f"First {p['prereq']}.",
                        f"Before any step, {p['prereq']}.",
                    ]
                ),
            ),
            (
                "signoff",
                rng.choice(
                    [
                        f"Completion is signed off by {p['signoff']}.",
                        f"The record is closed only after {p['signoff']} countersigns it.",
                    ]
                ),
            ),
            (
                "site",
                rng.choice(
                    [
                        f"This version is written for the bays at {p['site'][0]}.",
                        f"The instruction was validated at {p['site'][0]}.",
                    ]
                ),
            ),
        ]
        fill = GENERIC_FILLERS + [
            "Record serial numbers before and after the work.",
            "Stop and call the responsible engineer if anything looks unusual.",
        ]
        text, keys = assemble(rng, lead, opt, fill)
        p["doc"] = corpus.add(
            f"{p['id']}: {noun} of the {c['name']}", text, "procedure", {"kind": "procedure", "proc": p, "keys": keys}
        )

    # ---- error codes -------------------------------------------------------
    errors = []
    err_numbers = rng.sample(range(1000, 9999), 260)
    seen = set()
    while len(errors) < 260:
        comp = rng.choice(components)
        mn, meaning, _ = rng.choice([k for k in ERROR_KINDS if fits(k[2], comp)])
        if (comp["name"], mn) in seen:
            continue
        seen.add((comp["name"], mn))
        e = {
            "code": f"E-{err_numbers[len(errors)]}",
            "mn": mn,
            "meaning": meaning,
            "comp": comp,
            "sev": rng.choice(SEVERITIES),
            "action": rng.choice(FIRST_ACTIONS),
            "repeat": rng.randint(2, 6),
            "window": rng.choice([5, 10, 15, 30, 60]),
            "team": comp["owner"] if rng.random() < 0.6 else rng.choice(teams),
            "false_alarm": rng.choice(FALSE_ALARMS),
            "proc": rng.choice(comp["procedures"]) if comp["procedures"] else None,
        }
        comp["errors"].append(e)
        errors.append(e)

    for e in errors:
        c = e["comp"]
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"Error {e['code']} ({e['mn']}) is raised by the {c['name']} when {e['meaning']}.",
                        f"The {c['name']} reports fault {e['code']}, tagged {e['mn']}, when {e['meaning']}.",
                        f"Code {e['code']} / {e['mn']} appears on the {c['name']} if {e['meaning']}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "severity",
                rng.choice(
                    [
                        f"It is classed as severity {e['sev'][0]}, {e['sev'][1]}.",
                        f"Triage rates it severity {e['sev'][0]}, {e['sev'][1]}.",
                    ]
                ),
            ),
            (
                "action",
                rng.choice(
                    [
                        f"The first response is to {e['action']}.",
                        f"Operators should {e['action']} before anything else.",
                    ]
                ),
            ),
            (
                "escalation",
                rng.choice(
                    [
                        f"If it repeats {e['repeat']} times within {e['window']} minutes, page the {e['team']['name']} on-call.",
                        f"Escalate to {e['team']['name']} once it has fired {e['repeat']} times inside {e['window']} minutes.",
                    ]
                ),
            ),
            (
                "false_alarm",
                rng.choice(
                    [
                        f"Spurious occurrences are known during {e['false_alarm']}.",
                        f"It can trip without a real fault during {e['false_alarm']}.",
                    ]
                ),
            ),
        ]
        if e["proc"]:
            p = e["proc"]
            opt.append(
                (
                    "procedure",
                    rng.choice(
                        [
                            f"If the fault persists, follow procedure {p['id']} to {p['act'][0]} the unit.",
                            f"A persistent fault is cleared by procedure {p['id']}, which has you {p['act'][0]} the unit.",
                        ]
                    ),
                )
            )
        fill = GENERIC_FILLERS + [
            "Log every occurrence in the anomaly tracker.",
            f"Attach the {c['alias']} serial number to the ticket.",
        ]
        text, keys = assemble(rng, lead, opt, fill)
        e["doc"] = corpus.add(
            f"Error {e['code']} {e['mn']} on the {c['name']}",
            text,
            "error-code",
            {"kind": "error", "err": e, "keys": keys},
        )

    # ---- policies ----------------------------------------------------------
    combos = [(t, s) for t in range(len(POLICY_TOPICS)) for s in range(len(SITES))]
    chosen = rng.sample(combos, 150)
    chosen.sort()
    pol_numbers = rng.sample(range(100, 999), 150)
    policies = []
    for i, (ti, si) in enumerate(chosen):
        topic = POLICY_TOPICS[ti]
        name, rule, lo, hi, step, _ = topic
        pol = {
            "id": f"POL-{pol_numbers[i]}",
            "topic": topic,
            "site": SITES[si],
            "n": pick_value(rng, lo, hi, step),
            "approver": rng.choice(APPROVERS),
            "year": rng.randint(2019, 2024),
            "month": rng.choice(MONTHS),
            "review": rng.choice([1, 2, 3]),
        }
        policies.append(pol)
    rng.shuffle(policies)
    for pol in policies:
        name = pol["topic"][0]
        site_full = pol["site"][0]
        rule = pol["topic"][1].format(n=fmt_num(pol["n"]))
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"{pol['id']}, the {name} for {site_full}, states that {rule}.",
                        f"Under {pol['id']} ({name}, {site_full} edition), {rule}.",
                        f"At {site_full}, the {name} ({pol['id']}) sets the rule that {rule}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "approver",
                rng.choice(
                    [
                        f"Exceptions must be approved in writing by {pol['approver']}.",
                        f"Only {pol['approver']} can grant a waiver.",
                    ]
                ),
            ),
            (
                "effective",
                rng.choice(
                    [
                        f"The current text took effect in {pol['month']} {pol['year']}.",
                        f"This revision has applied since {pol['month']} {pol['year']}.",
                    ]
                ),
            ),
            (
                "review",
                rng.choice(
                    [
                        f"It is reviewed every {pol['review']} year{'s' if pol['review'] > 1 else ''}.",
                        f"The owners revisit it on a {pol['review']}-year cycle.",
                    ]
                ),
            ),
            (
                "scope",
                rng.choice(
                    [
                        "It applies to employees, contractors and long-term visitors alike.",
                        "Contractors are bound by it exactly as employees are.",
                    ]
                ),
            ),
            (
                "breach",
                rng.choice(
                    [
                        "Breaches are recorded and may lead to loss of site access.",
                        "Repeated violations are referred to the people operations lead.",
                    ]
                ),
            ),
        ]
        text, keys = assemble(rng, lead, opt, GENERIC_FILLERS)
        pol["doc"] = corpus.add(
            f"{pol['id']} {name} ({site_full})", text, "policy", {"kind": "policy", "pol": pol, "keys": keys}
        )

    # ---- teams -------------------------------------------------------------
    for t in teams:
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"The {t['name']} team {t['mission']} and is based at {t['site'][0]}.",
                        f"Based at {t['site'][0]}, {t['name']} {t['mission']}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "lead",
                rng.choice(
                    [
                        f"It is led by {t['lead']}.",
                        f"{t['lead']} manages the group.",
                    ]
                ),
            ),
            (
                "headcount",
                rng.choice(
                    [
                        f"The team has {t['headcount']} members.",
                        f"Headcount currently stands at {t['headcount']}.",
                    ]
                ),
            ),
            (
                "channel",
                rng.choice(
                    [
                        f"Reach them in the {t['channel']} chat channel.",
                        f"Requests go to the {t['channel']} channel.",
                    ]
                ),
            ),
            (
                "rotation",
                rng.choice(
                    [
                        f"On-call duty rotates {t['rotation']}.",
                        f"Their pager rotation runs {t['rotation']}.",
                    ]
                ),
            ),
        ]
        if t["components"]:
            names = [c["name"] for c in t["components"]]
            listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            opt.append(
                (
                    "components",
                    rng.choice(
                        [
                            f"It is responsible for the {listing}.",
                            f"Hardware under its ownership: the {listing}.",
                        ]
                    ),
                )
            )
        fill = GENERIC_FILLERS + [
            "New starters shadow an experienced member for two weeks.",
            "The group holds a short stand-up every morning.",
        ]
        text, keys = assemble(rng, lead, opt, fill)
        t["doc"] = corpus.add(f"Team profile: {t['name']}", text, "team", {"kind": "team", "team": t, "keys": keys})

    # ---- sites / buildings -------------------------------------------------
    buildings = []
    for site in SITES:
        region = rng.choice(REGIONS)
        nums = sorted(rng.sample(range(1, 15), rng.choice([3, 3, 4])))
        for num in nums:
            buildings.append({"site": site, "region": region, "num": num})
    buildings = buildings[:80]
    for b in buildings:
        b.update(
            {
                "func": rng.choice(BUILDING_FUNCTIONS),
                "floors": rng.randint(1, 5),
                "hours": rng.choice(ACCESS_HOURS),
                "officer": person(rng),
                "parking": rng.randint(10, 240),
            }
        )
        site_full = b["site"][0]
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"Building {b['num']} at {site_full}, in {b['region']}, houses {b['func'][0]}.",
                        f"{site_full} building {b['num']} contains {b['func'][0]}; the site sits in {b['region']}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "floors",
                rng.choice(
                    [
                        f"It has {b['floors']} floor{'s' if b['floors'] > 1 else ''}.",
                        f"The structure spans {b['floors']} level{'s' if b['floors'] > 1 else ''}.",
                    ]
                ),
            ),
            (
                "hours",
                rng.choice(
                    [
                        f"Access is open {b['hours']}.",
                        f"Doors are unlocked {b['hours']}.",
                    ]
                ),
            ),
            (
                "officer",
                rng.choice(
                    [
                        f"The safety officer for the building is {b['officer']}.",
                        f"{b['officer']} acts as safety officer here.",
                    ]
                ),
            ),
            (
                "parking",
                rng.choice(
                    [
                        f"The adjacent lot holds {b['parking']} cars.",
                        f"There are {b['parking']} parking spaces next to it.",
                    ]
                ),
            ),
        ]
        fill = GENERIC_FILLERS + [
            "Fire assembly points are marked on the map at each entrance.",
            "Deliveries must be booked a day in advance.",
            "Visitors sign in at the main gatehouse.",
        ]
        text, keys = assemble(rng, lead, opt, fill)
        b["doc"] = corpus.add(
            f"{site_full}, Building {b['num']}", text, "site", {"kind": "building", "bld": b, "keys": keys}
        )

    # ---- incidents ---------------------------------------------------------
    inc_comps = rng.sample([c for c in components if c["errors"]], 170)
    inc_numbers = rng.sample(range(1000, 9999), 170)
    incidents = []
    for i, comp in enumerate(inc_comps):
        inc = {
            "id": f"INC-{inc_numbers[i]}",
            "comp": comp,
            "err": rng.choice(comp["errors"]),
            "site": rng.choice(SITES),
            "month": rng.choice(MONTHS),
            "year": rng.randint(2020, 2024),
            "cause": rng.choice(ROOT_CAUSES),
            "hours": rng.randint(1, 72),
            "impact": rng.choice(IMPACTS),
            "followup": rng.choice(FOLLOWUPS),
            "commander": person(rng),
        }
        incidents.append(inc)
    for inc in incidents:
        c = inc["comp"]
        site_full = inc["site"][0]
        lead = [
            (
                "intro",
                rng.choice(
                    [
                        f"Incident {inc['id']}: in {inc['month']} {inc['year']} the {c['name']} at {site_full} raised {inc['err']['code']}.",
                        f"{inc['id']} covers the {inc['month']} {inc['year']} event at {site_full}, where the {c['name']} threw {inc['err']['code']}.",
                    ]
                ),
            )
        ]
        opt = [
            (
                "cause",
                rng.choice(
                    [
                        f"The root cause was {inc['cause']}.",
                        f"Investigation traced it to {inc['cause']}.",
                    ]
                ),
            ),
            (
                "duration",
                rng.choice(
                    [
                        f"Service was degraded for {inc['hours']} hour{'s' if inc['hours'] > 1 else ''}.",
                        f"Recovery took {inc['hours']} hour{'s' if inc['hours'] > 1 else ''}.",
                    ]
                ),
            ),
            (
                "impact",
                rng.choice(
                    [
                        f"Impact: {inc['impact']}.",
                        f"As a consequence, {inc['impact']}.",
                    ]
                ),
            ),
            (
                "followup",
                rng.choice(
                    [
                        f"The corrective action is {inc['followup']}.",
                        f"To prevent a repeat, the team is {inc['followup']}.",
                    ]
                ),
            ),
            (
                "commander",
                rng.choice(
                    [
                        f"{inc['commander']} served as incident commander.",
                        f"The response was coordinated by {inc['commander']}.",
                    ]
                ),
            ),
        ]
        text, keys = assemble(rng, lead, opt, GENERIC_FILLERS)
        inc["doc"] = corpus.add(
            f"Postmortem {inc['id']}", text, "incident", {"kind": "incident", "inc": inc, "keys": keys}
        )

    return corpus


# --------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------


def fix_articles(text: str) -> str:
    """'a Umber relay' -> 'an Umber relay'."""
    return re.sub(r"\b([Aa]) (?=[AEIOUaeiou])(?![Uu]ni|[Uu]se)", r"\1n ", text)


def comp_ref(rng: random.Random, c: dict) -> str:
    return rng.choice(
        [
            f"{c['code']} {c['alias']}",
            f"{c['code']} {c['alias']}",
            f"{c['name']}",
            f"{c['part']} {c['alias']}",
            f"{c['code']} unit ({c['part']})",
        ]
    )


def site_ref(rng: random.Random, site: tuple[str, str]) -> str:
    return rng.choice([site[1], site[1], site[0]])


def make_query(rng: random.Random, f: dict):
    """Return (query text, [(doc_id, score), ...]) or None if no fact fits."""
    keys = [k for k in f["keys"] if k not in ("intro", "filler")]
    kind = f["kind"]
    if kind == "component":
        c = f["comp"]
        key = rng.choice(keys + ["intro"])
        r = comp_ref(rng, c)
        _, spec_q, *_ = c["spec"]
        q = {
            "intro": [f"what job does the {r} do", f"purpose of the {r}?", f"What is the {r} for?"],
            "spec": [f"What {spec_q} should I expect from the {r}?", f"{r} - what's the specified {spec_q}?"],
            "interval": [f"How often does the {r} need servicing?", f"what is the upkeep schedule for the {r}"],
            "vendor": [f"Who manufactures the {r}?", f"which supplier do we buy the {r} from"],
            "owner": [f"Which group is accountable for the {r}?", f"who should I talk to about changes to the {r}"],
            "location": [f"where would I find a {r} to look at?", f"Which facility has the {r} hardware?"],
            "symptom": [
                f"What are the warning signs that a {r} is going bad?",
                f"how can I tell the {r} is wearing out",
            ],
        }[key]
        rel = [(c["doc"], 2)] if key == "owner" else [(c["doc"], 1)]
        if key == "owner":
            rel.append((c["owner"]["doc"], 1))
        return rng.choice(q), rel
    if kind == "procedure":
        p = f["proc"]
        c = p["comp"]
        act = p["act"][2]
        r = comp_ref(rng, c)
        key = rng.choice(keys + ["intro"])
        q = {
            "intro": [
                f"Is there a written method to {act} the {r}?",
                f"which work instruction tells me how to {act} a {r}",
            ],
            "duration": [f"How much time should I budget to {act} the {r}?", f"how long does it take to {act} a {r}"],
            "staff": [f"How many people are needed to {act} the {r}?", f"crew size required to {act} the {r}?"],
            "tool": [f"What equipment do I need to {act} the {r}?", f"tools to bring when I {act} a {r}"],
            "prereq": [
                f"What has to happen before I {act} the {r}?",
                f"safety preparation needed prior to when we {act} the {r}",
            ],
            "signoff": [
                f"Who approves the paperwork after we {act} the {r}?",
                f"whose signature closes out the job to {act} a {r}",
            ],
            "site": [
                f"Which facility validated the instructions to {act} the {r}?",
                f"where was the method to {act} the {r} proven out",
            ],
        }[key]
        return rng.choice(q), [(p["doc"], 1)]
    if kind == "error":
        e = f["err"]
        c = e["comp"]
        r = rng.choice([f"the {comp_ref(rng, c)}", f"the {comp_ref(rng, c)}", "the hardware", "my unit"])
        key = rng.choice(keys + ["intro"])
        code = e["code"]
        q = {
            "intro": [
                f"My {comp_ref(rng, c)} is showing {code} - what does that mean?",
                f"meaning of fault {code} on a {comp_ref(rng, c)}",
            ],
            "severity": [
                f"How critical is {code} when {r} reports it?",
                f"what priority should {code} on the {comp_ref(rng, c)} get",
            ],
            "action": [
                f"What should I try first when {r} throws {code}?",
                f"initial troubleshooting step for {code} from the {comp_ref(rng, c)}",
            ],
            "escalation": [
                f"When does {code} from the {comp_ref(rng, c)} need escalating, and to whom?",
                f"at what point should I call for help about {code} on the {comp_ref(rng, c)}",
            ],
            "false_alarm": [
                f"Can {code} on the {comp_ref(rng, c)} be a false alarm?",
                f"is {code} from the {comp_ref(rng, c)} ever spurious",
            ],
            "procedure": [
                f"{code} keeps coming back on the {comp_ref(rng, c)}; which work instruction fixes it?",
                f"permanent fix for a recurring {code} on the {comp_ref(rng, c)}?",
            ],
        }[key]
        if key == "procedure":
            rel = [(e["doc"], 2), (e["proc"]["doc"], 1)]
        else:
            rel = [(e["doc"], 1)]
        return rng.choice(q), rel
    if kind == "policy":
        pol = f["pol"]
        s = site_ref(rng, pol["site"])
        key = rng.choice(keys + ["intro", "intro"])
        topic_short = pol["topic"][0].replace(" Policy", "").lower()
        q = {
            "intro": [f"At {s}, {rng.choice(pol['topic'][5])}?", f"{rng.choice(pol['topic'][5])} at {s}?"],
            "approver": [
                f"who can waive the {topic_short} rules at {s}",
                f"At {s}, who grants exceptions to the {topic_short} rules?",
            ],
            "effective": [
                f"since when has the current {topic_short} rulebook applied at {s}?",
                f"when did the latest {topic_short} rules for {s} come into force",
            ],
            "review": [
                f"how frequently is the {s} {topic_short} guidance revisited",
                f"review cadence of {topic_short} rules at {s}?",
            ],
            "scope": [f"do the {topic_short} rules at {s} cover contractors too?"],
            "breach": [f"what happens if someone ignores the {topic_short} rules at {s}"],
        }[key]
        return rng.choice(q), [(pol["doc"], 1)]
    if kind == "team":
        t = f["team"]
        name = t["name"]
        key = rng.choice(keys + ["intro"])
        q = {
            "intro": [f"what does the {name} group work on?", f"{name} team: mission and location"],
            "lead": [f"Who runs {name}?", f"name of the manager of the {name} group"],
            "headcount": [f"How many people work in {name}?", f"size of the {name} group"],
            "channel": [f"How do I get hold of the {name} folks?", f"where should I post a request for {name}"],
            "rotation": [f"How is pager duty organised in {name}?", f"on-call schedule for the {name} group"],
            "components": [f"What hardware does {name} look after?", f"list of parts that {name} is accountable for"],
        }[key]
        if key == "components":
            # Component pages that name this team as owner are partially relevant.
            extra = [(c["doc"], 1) for c in t["components"] if "owner" in c["keys"]]
            if extra:
                return rng.choice(q), [(t["doc"], 2)] + extra
        return rng.choice(q), [(t["doc"], 1)]
    if kind == "building":
        b = f["bld"]
        s = site_ref(rng, b["site"])
        n = b["num"]
        key = rng.choice(keys + ["intro"])
        q = {
            "intro": [f"What is in building {n} at {s}?", f"Where is the {b['func'][1]} at {s}? Is it building {n}?"],
            "floors": [f"How many storeys does {s} building {n} have?", f"number of levels in building {n}, {s}"],
            "hours": [f"When can I get into building {n} at {s}?", f"opening times for {s} bldg {n}"],
            "officer": [f"Who is the safety contact for building {n} at {s}?", f"{s} building {n} safety lead"],
            "parking": [
                f"How much car parking is there by building {n} at {s}?",
                f"parking capacity near {s} building {n}",
            ],
        }[key]
        return rng.choice(q), [(b["doc"], 1)]
    if kind == "incident":
        inc = f["inc"]
        c = inc["comp"]
        s = site_ref(rng, inc["site"])
        when = f"{inc['month']} {inc['year']}"
        ref = rng.choice(
            [
                inc["id"],
                f"the {when} {comp_ref(rng, c)} failure at {s}",
                f"the {inc['err']['code']} outage at {s} in {when}",
            ]
        )
        key = rng.choice(keys + ["intro"])
        q = {
            "intro": [f"Is there a postmortem for {ref}?", f"write-up of {ref}"],
            "cause": [f"What caused {ref}?", f"root cause analysis for {ref}"],
            "duration": [f"How long did {ref} last?", f"time to recover from {ref}"],
            "impact": [f"What was the fallout from {ref}?", f"consequences of {ref}"],
            "followup": [f"What corrective action came out of {ref}?", f"how are we stopping a repeat of {ref}"],
            "commander": [f"Who led the response to {ref}?", f"incident commander for {ref}"],
        }[key]
        return rng.choice(q), [(inc["doc"], 1)]
    raise ValueError(kind)


TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def tokens(s: str) -> list[str]:
    return TOKEN_RE.findall(s.lower())


def ngrams(toks: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def is_paraphrase(query: str, doc_text: str, max_shared: int = 6) -> bool:
    if query.lower() in doc_text.lower():
        return False
    return not (ngrams(tokens(query), max_shared) & ngrams(tokens(doc_text), max_shared))


def check_paraphrase(query: str, doc_text: str, max_shared: int = 6) -> None:
    """Assert the query is not lifted from the document.

    The query must not be a substring of the document (case-insensitive) and
    must not share any run of ``max_shared`` consecutive tokens with it.
    """
    assert query.lower() not in doc_text.lower(), (query, doc_text)
    shared = ngrams(tokens(query), max_shared) & ngrams(tokens(doc_text), max_shared)
    assert not shared, (query, shared, doc_text)


def build_queries(rng: random.Random, corpus: Corpus, n_test: int, n_train: int):
    # Target documents: stratified so every category is represented.
    by_cat: dict[str, list[int]] = {}
    for i, f in enumerate(corpus.facts):
        by_cat.setdefault(f["category"], []).append(i)
    total = n_test + n_train
    targets: list[int] = []
    cats = sorted(by_cat)
    for ci, cat in enumerate(cats):
        idx = by_cat[cat]
        if ci == len(cats) - 1:
            k = total - len(targets)
        else:
            k = round(total * len(idx) / len(corpus.docs))
        targets.extend(rng.sample(idx, k))
    rng.shuffle(targets)

    text_by_id = {d["_id"]: d["text"] for d in corpus.docs}
    queries, rels = [], []
    seen_text = set()
    for di in targets:
        # Redraw (template, fact, entity wording) until the query is new and
        # passes the paraphrase check against every relevant document.
        for _ in range(50):
            qtext, rel = make_query(rng, corpus.facts[di])
            qtext = fix_articles(qtext[0].upper() + qtext[1:])
            if qtext not in seen_text and all(is_paraphrase(qtext, text_by_id[d]) for d, _ in rel):
                break
        assert qtext not in seen_text, qtext
        seen_text.add(qtext)
        for doc_id, _ in rel:
            check_paraphrase(qtext, text_by_id[doc_id])
        qid = f"q{len(queries) + 1:04d}"
        queries.append({"_id": qid, "text": qtext})
        rels.append((qid, rel))

    order = list(range(len(queries)))
    rng.shuffle(order)
    test_idx = sorted(order[:n_test])
    train_idx = sorted(order[n_test:])
    test = [rels[i] for i in test_idx]
    train = [rels[i] for i in train_idx]
    return queries, test, train


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_qrels(path: Path, rels: list[tuple[str, list[tuple[str, int]]]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, pairs in rels:
            for doc_id, score in pairs:
                fh.write(f"{qid}\t{doc_id}\t{score}\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = ap.parse_args(argv)

    rng = random.Random(SEED)
    corpus = build(rng)
    ids = [d["_id"] for d in corpus.docs]
    assert len(ids) == len(set(ids))
    titles = [d["title"] for d in corpus.docs]
    assert len(titles) == len(set(titles)), "titles should be unique"
    queries, test, train = build_queries(rng, corpus, n_test=200, n_train=400)

    out: Path = args.out
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", corpus.docs)
    write_jsonl(out / "queries.jsonl", queries)
    write_qrels(out / "qrels" / "test.tsv", test)
    write_qrels(out / "qrels" / "train.tsv", train)
    print(f"wrote {len(corpus.docs)} docs, {len(queries)} queries ({len(test)} test, {len(train)} train) to {out}")


if __name__ == "__main__":
    main()
