"""A synthetic encyclopedia world: entities with attributes, written out as articles in varied templates.

Every fact (a person's birth city, employer, ...) is stated in several documents with different sentence
templates, so the same fact recurs in different contexts: the setting in which a kNN-LM's datastore helps.
The generated ``world`` (the facts themselves) is kept beside the corpus so that later stages can build
tasks from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ONSETS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "dr",
    "gr",
    "kr",
    "pr",
    "sh",
    "st",
    "th",
    "tr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "nd", "m", "x"]

OCCUPATIONS = [
    "painter",
    "chemist",
    "engineer",
    "poet",
    "historian",
    "architect",
    "surgeon",
    "composer",
    "astronomer",
    "botanist",
    "economist",
    "sculptor",
    "linguist",
    "physicist",
    "novelist",
]
FIELDS = [
    "mathematics",
    "medicine",
    "music",
    "law",
    "biology",
    "history",
    "physics",
    "poetry",
    "engineering",
    "philosophy",
    "chemistry",
    "geology",
]
INDUSTRIES = [
    "shipping",
    "textiles",
    "mining",
    "publishing",
    "railways",
    "banking",
    "glassmaking",
    "brewing",
    "printing",
    "steel",
]
TERRAINS = ["river", "mountain", "coastal", "desert", "lake", "valley"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _names(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = _word(rng, rng.randint(*syllables)).capitalize()
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass
class World:
    people: list[dict]
    cities: list[dict]
    companies: list[dict]
    universities: list[dict]

    def to_dict(self) -> dict:
        return {
            "people": self.people,
            "cities": self.cities,
            "companies": self.companies,
            "universities": self.universities,
        }


def make_world(seed: int, n_people: int, n_cities: int, n_companies: int, n_universities: int) -> World:
    rng = random.Random(seed)
    taken: set[str] = set()
    city_names = _names(rng, n_cities, (2, 3), taken)
    cities = [
        {"name": c, "country": None, "terrain": rng.choice(TERRAINS), "founded": rng.randint(1100, 1800)}
        for c in city_names
    ]
    countries = _names(rng, max(3, n_cities // 8), (2, 3), taken)
    for c in cities:
        c["country"] = rng.choice(countries)
    universities = [
        {"name": f"University of {u}", "city": rng.choice(city_names), "field": rng.choice(FIELDS)}
        for u in _names(rng, n_universities, (2, 3), taken)
    ]
    given = _names(rng, max(50, n_people // 3), (1, 2), taken)
    surnames = _names(rng, max(50, n_people // 3), (2, 3), taken)
    full: set[str] = set()
    people = []
    while len(people) < n_people:
        name = f"{rng.choice(given)} {rng.choice(surnames)}"
        if name in full:
            continue
        full.add(name)
        born = rng.randint(1850, 1990)
        people.append(
            {
                "name": name,
                "born": born,
                "birth_city": rng.choice(city_names),
                "living_city": rng.choice(city_names),
                "occupation": rng.choice(OCCUPATIONS),
                "university": rng.choice(universities)["name"],
                "employer": None,
                "friend": None,
            }
        )
    companies = []
    for cname in _names(rng, n_companies, (2, 3), taken):
        founder = rng.choice(people)
        companies.append(
            {
                "name": f"{cname} {rng.choice(['Works', 'Company', 'Group', 'Trading'])}",
                "founder": founder["name"],
                "city": rng.choice(city_names),
                "industry": rng.choice(INDUSTRIES),
                "founded": founder["born"] + rng.randint(20, 45),
            }
        )
    for p in people:
        p["employer"] = rng.choice(companies)["name"]
        p["friend"] = rng.choice(people)["name"]
    return World(people, cities, companies, universities)


_PERSON_TEMPLATES = [
    "{name} was born in {birth_city} in {born} .",
    "{name} ( born {born} in {birth_city} ) is a {occupation} .",
    "Born in {birth_city} , {name} later moved to {living_city} .",
    "{name} is a {occupation} who lives in {living_city} .",
    "{name} studied at the {university} .",
    "After graduating from the {university} , {name} joined {employer} .",
    "{name} works for {employer} as a {occupation} .",
    "{name} is employed by {employer} .",
    "A close friend of {friend} , {name} often visited {living_city} .",
    "{name} and {friend} have been friends since their time at the {university} .",
    "The {occupation} {name} was born in {born} .",
    "In {born} , {name} was born in the city of {birth_city} .",
]
_CITY_TEMPLATES = [
    "{name} is a {terrain} city in {country} .",
    "{name} was founded in {founded} .",
    "The city of {name} lies in {country} and was founded in {founded} .",
    "{name} , a {terrain} town , is known across {country} .",
]
_COMPANY_TEMPLATES = [
    "{name} was founded by {founder} in {founded} .",
    "{name} is a {industry} company based in {city} .",
    "{founder} founded {name} , a {industry} business , in {city} .",
    "The headquarters of {name} are in {city} .",
]


def _article(rng: random.Random, kind: str, entity: dict, world: World) -> str:
    templates = {"person": _PERSON_TEMPLATES, "city": _CITY_TEMPLATES, "company": _COMPANY_TEMPLATES}[kind]
    picked = rng.sample(templates, k=rng.randint(max(2, len(templates) // 3), len(templates)))
    sentences = [t.format(**entity) for t in picked]
    if kind == "city":
        natives = [p for p in world.people if p["birth_city"] == entity["name"]]
        for p in rng.sample(natives, k=min(len(natives), rng.randint(1, 4))):
            sentences.append(f"The {p['occupation']} {p['name']} was born in {entity['name']} .")
    if kind == "company":
        staff = [p for p in world.people if p["employer"] == entity["name"]]
        for p in rng.sample(staff, k=min(len(staff), rng.randint(1, 4))):
            sentences.append(f"{p['name']} works at {entity['name']} as a {p['occupation']} .")
    return " ".join(sentences)


def generate_documents(seed: int, n_documents: int, world: World) -> list[str]:
    """``n_documents`` articles; people are sampled more often than places so that their facts recur."""
    rng = random.Random(seed + 1)
    kinds = rng.choices(["person", "city", "company"], weights=[0.8, 0.1, 0.1], k=n_documents)
    pools = {"person": world.people, "city": world.cities, "company": world.companies}
    return [_article(rng, kind, rng.choice(pools[kind]), world) for kind in kinds]
