"""Synthetic PII corpus with planted memorization and per-character ground truth.

Records are filled from templates: the template text is shared by every record
(learnable by generalization) while the PII values are drawn fresh for each
record (learnable only by memorization). Canary records are repeated
``duplication`` times in training; non-members are drawn from the same
distribution and never trained on.

Example:
    >>> corpus = build_corpus(CorpusConfig(n_general=100, canaries_per_count=2))
    >>> rec = corpus.records[0]
    >>> rec.text[rec.spans[0].start:rec.spans[0].end]  # the first PII value
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

from faker import Faker
from faker.providers.date_time import change_year

from memlens.core.errors import ConfigError
from memlens.core.sequences import PiiSpan

__all__ = ["GENERIC_FILLERS", "PII_FIELDS", "REFERENCE_DAY", "TEMPLATES", "Corpus", "CorpusConfig",
           "Record", "build_corpus", "natural_texts"]

# Each slot is either a PII field (random per record) or a generic filler drawn
# from a short list (learnable distribution, never memorized).
TEMPLATES: dict[str, list[str]] = {
    "bio": [
        "Biography. {name} was born on {dob} and works as a {job} at {company}. "
        "They live at {address}. You can call them at {phone} or write to {email}. "
        "Their social security number is {ssn}.",
        "Profile of {name}, a {job} born {dob}. Employer: {company}. Home address: {address}. "
        "Contact phone {phone}, email {email}, SSN {ssn}.",
    ],
    "email": [
        "From: {email}\nSubject: {subject}\n\n{greeting},\nI am {name}, born {dob}. "
        "Please update my records: my new address is {address} and my phone number is {phone}. "
        "My SSN is {ssn}.\n{closing}",
        "From: {email}\nSubject: {subject}\n\n{greeting},\nThis is {name} from {company}. "
        "My date of birth is {dob}. You can reach me at {phone}, or send mail to {address}. "
        "For verification, my SSN is {ssn}.\n{closing}",
    ],
    "forum": [
        "Forum post by {username} in {topic}: {opener} My name is {name} and I moved to {address} "
        "last month. If anyone wants to meet up, text me at {phone} or email {email}. "
        "My birthday is {dob}.",
        "Thread: {topic}. Reply from {username}: {opener} I work as a {job} at {company}. "
        "Find me at {address}, call {phone} or write to {email}. Born {dob}.",
    ],
    "record": [
        "PATIENT RECORD | Name: {name} | DOB: {dob} | SSN: {ssn} | Address: {address} | "
        "Phone: {phone} | Email: {email} | Employer: {company}",
        "Customer account {account}: {name}, born {dob}. Billing address {address}. "
        "Phone {phone}. Email {email}. Tax ID {ssn}.",
    ],
    "review": [
        "Review by {name} of {company}: {rating} stars. {review} Reach me at {phone} or {email} "
        "if you have questions. My address is {address}. Posted on {date}.",
        "{rating} out of 5 for {company}. {review} Written by {name} ({username}), {job}. "
        "Contact: {phone}, {email}, {address}.",
    ],
}

GENERIC_FILLERS: dict[str, list[str]] = {
    "subject": ["Account update", "Change of address", "Records request", "Quick question",
                "Please confirm"],
    "greeting": ["Hello", "Hi there", "Dear team", "Good morning", "To whom it may concern"],
    "closing": ["Thank you.", "Best regards.", "Thanks in advance.", "Kind regards."],
    "topic": ["Local Events", "Moving Advice", "Neighborhood Watch", "Book Club", "Gardening"],
    "opener": ["Hello everyone!", "Long time reader, first post.", "Quick introduction here.",
               "Hi all, new to the area."],
    "review": ["Great service and friendly staff.", "Slow delivery but good quality.",
               "Would not recommend.", "Exactly as described.", "Helpful support team."],
    "rating": ["1", "2", "3", "4", "5"],
}

PII_FIELDS = ("name", "dob", "date", "job", "company", "address", "phone", "email", "ssn",
              "username", "account")
_SLOT = re.compile(r"\{(\w+)\}")


@dataclass
class Record:
    """One document of the corpus.

    ``role`` is ``general`` (member, seen once), ``canary`` (member, seen
    ``duplication`` times) or ``nonmember`` (never trained on, duplication 0).
    """

    id: int
    text: str
    content_type: str
    template: int
    role: str
    duplication: int
    spans: list[PiiSpan] = field(default_factory=list)

    @property
    def member(self) -> bool:
        return self.duplication > 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["member"] = self.member
        return d


@dataclass
class CorpusConfig:
    """How many records of each kind, and how often canaries repeat."""

    n_general: int = 8000
    canaries_per_count: int = 40
    duplication_counts: tuple[int, ...] = (1, 5, 10, 25, 100)
    n_nonmembers: int = 200
    seed: int = 0
    # "template": general records are PII records like the canaries (organisms trained from
    # scratch); "natural": English prose (for continued pre-training of a real model).
    general: str = "template"
    n_heldout: int = 0  # natural-text chunks kept out of training, for held-out perplexity

    def __post_init__(self):
        self.duplication_counts = tuple(int(c) for c in self.duplication_counts)
        if any(c < 1 for c in self.duplication_counts):
            raise ConfigError(f"duplication_counts must be >= 1, got {self.duplication_counts}")
        if self.general not in ("template", "natural"):
            raise ConfigError(f"general must be 'template' or 'natural', got {self.general!r}")


@dataclass
class Corpus:
    config: CorpusConfig
    records: list[Record]
    heldout: list[str] = field(default_factory=list)  # natural text never trained on

    def by_role(self, role: str) -> list[Record]:
        return [r for r in self.records if r.role == role]

    def training_stream(self) -> list[Record]:
        """Every member, repeated by its duplication count (unshuffled)."""
        return [r for r in self.records for _ in range(r.duplication)]


# The day the corpus's dates count back from. Faker counts from today, which would make the
# corpus, and every organism trained on it, change at midnight; the cache key could not see it.
REFERENCE_DAY = date(2026, 12, 5)


class _PiiFactory:
    def __init__(self, seed: int):
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed)
        self.rng = random.Random(seed)

    def value(self, slot: str) -> str:
        f = self.fake
        match slot:
            case "name":
                return f"{f.first_name()} {f.last_name()}"
            case "dob":  # Faker's date_of_birth(18, 90), counted from REFERENCE_DAY
                start = change_year(REFERENCE_DAY, -91)
                dob = f.date_time_ad(start_datetime=start,
                                     end_datetime=change_year(REFERENCE_DAY, -18)).date()
                return (dob if dob != start else dob + timedelta(days=1)).strftime("%B %d, %Y")
            case "date":  # Faker's date_between("-3y", "today"), counted from REFERENCE_DAY
                return f.date_between_dates(REFERENCE_DAY + timedelta(days=-365.24 * 3),
                                            REFERENCE_DAY).strftime("%m/%d/%Y")
            case "job":
                return f.job().split(",")[0]
            case "company":
                return f.company()
            case "address":
                return f"{f.street_address()}, {f.city()}, {f.state_abbr()} {f.zipcode()}"
            case "phone":
                return f.numerify("###-###-####")
            case "email":
                return f"{f.user_name()}@{f.domain_name()}"
            case "ssn":
                return f.ssn()
            case "username":
                return f.user_name()
            case "account":
                return f.numerify("AC-#######")
        return self.rng.choice(GENERIC_FILLERS[slot])

    def record(self, rid: int, role: str, duplication: int) -> Record:
        content_type = self.rng.choice(sorted(TEMPLATES))
        template_id = self.rng.randrange(len(TEMPLATES[content_type]))
        template = TEMPLATES[content_type][template_id]
        parts, spans, pos = [], [], 0
        for m in _SLOT.finditer(template):
            literal = template[pos:m.start()]
            parts.append(literal)
            start = sum(len(p) for p in parts)
            slot = m.group(1)
            val = self.value(slot)
            parts.append(val)
            if slot in PII_FIELDS:
                spans.append(PiiSpan(slot, start, start + len(val)))
            pos = m.end()
        parts.append(template[pos:])
        return Record(rid, "".join(parts), content_type, template_id, role, duplication, spans)


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    letters = sum(c.isalpha() or c.isspace() or c in ",.;:'-()" for c in paragraph)
    return (len(words) >= 20 and paragraph.endswith(".") and ">>>" not in paragraph
            and letters / len(paragraph) >= 0.93)


@functools.cache
def _stdlib_prose() -> tuple[tuple[str, str], ...]:
    """(module, paragraph) pairs of English prose from the docstrings of the standard
    library's top-level modules, read without importing them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found, seen = [], set()  # some docstrings appear in two modules (abc and _py_abc)
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                for para in (ast.get_docstring(node) or "").split("\n\n"):
                    para = " ".join(para.split())
                    if _is_prose(para) and para not in seen:
                        seen.add(para)
                        found.append((path.stem, para))
    return tuple(found)


def natural_texts(chars: int = 500) -> tuple[list[str], list[str]]:
    """English prose available offline on every machine: the standard library's docstrings
    (prose paragraphs only, no code), joined into chunks of about ``chars`` characters.
    Returns (training chunks, held-out chunks); the held-out ones come from other modules,
    so no paragraph is shared."""
    chunks: dict[bool, list[str]] = {False: [], True: []}
    current, module = "", None
    for mod, para in (*_stdlib_prose(), ("", "")):
        if current and (mod != module or len(current) + len(para) > chars):
            heldout = hashlib.sha256(module.encode()).digest()[0] % 5 == 0
            chunks[heldout].append(current)
            current = ""
        current, module = (f"{current} {para}".strip(), mod)
    return chunks[False], chunks[True]


def build_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Draw the corpus deterministically from ``config.seed``."""
    config = config or CorpusConfig()
    factory = _PiiFactory(config.seed)
    if config.general == "natural":
        return _natural_corpus(config, factory)
    return Corpus(config, _pii_records(factory, [("general", 1)] * config.n_general
                                       + _canaries_and_nonmembers(config)))


def _canaries_and_nonmembers(config: CorpusConfig) -> list[tuple[str, int]]:
    return [("canary", c) for c in config.duplication_counts
            for _ in range(config.canaries_per_count)] + [("nonmember", 0)] * config.n_nonmembers


def _pii_records(factory: _PiiFactory, plan: list[tuple[str, int]], first_id: int = 0
                 ) -> list[Record]:
    """One PII record per (role, duplication) in ``plan``, every text unique."""
    records, seen = [], set()
    for role, dup in plan:
        rec = factory.record(first_id + len(records), role, dup)
        while rec.text in seen:  # vanishingly rare
            rec = factory.record(first_id + len(records), role, dup)
        seen.add(rec.text)
        records.append(rec)
    return records


def _natural_corpus(config: CorpusConfig, factory: _PiiFactory) -> Corpus:
    """Natural prose seen once each, PII canaries repeated, PII non-members, held-out prose."""
    train, heldout = natural_texts()
    rng = random.Random(config.seed)
    if config.n_general > len(train) or config.n_heldout > len(heldout):
        raise ConfigError(f"this Python's standard library gives {len(train)} training and "
                          f"{len(heldout)} held-out prose chunks; n_general="
                          f"{config.n_general} and n_heldout={config.n_heldout} ask for more")
    records = [Record(i, text, "natural", -1, "general", 1)
               for i, text in enumerate(rng.sample(train, config.n_general))]
    records += _pii_records(factory, _canaries_and_nonmembers(config), len(records))
    return Corpus(config, records, rng.sample(heldout, config.n_heldout))
