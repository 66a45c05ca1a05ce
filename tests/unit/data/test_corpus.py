"""The synthetic PII corpus: deterministic, with spans over the values."""

from memlens.data.corpus import PII_FIELDS, CorpusConfig, build_corpus

CFG = CorpusConfig(n_general=200, canaries_per_count=3, duplication_counts=(1, 5, 100),
                   n_nonmembers=20, seed=7)


def test_corpus_is_deterministic_per_seed():
    a, b = build_corpus(CFG), build_corpus(CFG)
    assert [r.to_json() for r in a.records] == [r.to_json() for r in b.records]
    c = build_corpus(CorpusConfig(**{**CFG.__dict__, "seed": 8}))
    assert [r.text for r in a.records] != [r.text for r in c.records]


def test_roles_counts_and_training_stream():
    corpus = build_corpus(CFG)
    assert len(corpus.by_role("general")) == 200
    assert len(corpus.by_role("canary")) == 9
    assert len(corpus.by_role("nonmember")) == 20
    stream = corpus.training_stream()
    assert len(stream) == 200 + 3 * (1 + 5 + 100)
    assert not any(r.role == "nonmember" for r in stream)
    counts = {r.id: 0 for r in corpus.by_role("canary")}
    for r in stream:
        if r.role == "canary":
            counts[r.id] += 1
    assert sorted(counts.values()) == [1, 1, 1, 5, 5, 5, 100, 100, 100]
    assert len({r.text for r in corpus.records}) == len(corpus.records)


def test_spans_cover_pii_values_and_not_template_text():
    corpus = build_corpus(CFG)
    types = set()
    for rec in corpus.records:
        types.add(rec.content_type)
        assert rec.spans, rec.text
        last = 0
        for sp in rec.spans:
            assert sp.field in PII_FIELDS
            assert last <= sp.start < sp.end <= len(rec.text)
            value = rec.text[sp.start:sp.end]
            assert value == value.strip() and value
            last = sp.end
    assert types == {"bio", "email", "forum", "record", "review"}
    # PII values differ between records while template words are shared.
    phones = [r.text[s.start:s.end] for r in corpus.records for s in r.spans if s.field == "phone"]
    assert len(set(phones)) == len(phones)


def test_the_corpus_is_the_same_whichever_day_it_is_built(monkeypatch):
    """Dates count back from a fixed day: an organism's corpus (and so the organism) must
    not change at midnight while its cache key stays the same."""
    import datetime as dt

    import faker.providers.date_time as faker_dates

    cfg = CorpusConfig(n_general=30, canaries_per_count=1, n_nonmembers=5)
    today = [r.text for r in build_corpus(cfg).records]

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2031, 7, 19, 12, tzinfo=tz)

    monkeypatch.setattr(faker_dates, "datetime", Later)
    assert faker_today_moved(), "the patch must move Faker's own idea of today"
    assert [r.text for r in build_corpus(cfg).records] == today
    assert "July 30, 2006" in build_corpus(CorpusConfig()).records[0].text


def faker_today_moved() -> bool:
    from faker import Faker

    return Faker().date_of_birth(minimum_age=0, maximum_age=0).year >= 2030
