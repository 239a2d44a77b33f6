"""The one rule for fitting a reward-model conversation into a context (backends/turns.py)."""

from __future__ import annotations

from synthpref.records import Message


def test_fit_turns_drops_whole_oldest_exchanges_and_keeps_the_reply():
    import pytest

    from synthpref.backends.base import RequestError
    from synthpref.backends.turns import fit_turns

    def conv(*roles_texts):
        return [Message(role=r, content=t) for r, t in roles_texts]

    msgs = conv(
        ("system", "s"),
        ("user", "u1 " * 10),
        ("assistant", "a1 " * 10),
        ("user", "u2"),
        ("assistant", "a2"),
    )

    def words(ms):
        return sum(len(m.content.split()) for m in ms)

    kept, dropped, tokens = fit_turns(msgs, words, 5, "drop_oldest_turns")
    assert [m.content for m in kept] == ["s", "u2", "a2"] and dropped == 2 and tokens == 3
    assert fit_turns(msgs, words, 100, "error") == (msgs, 0, 23)
    with pytest.raises(RequestError, match="23 tokens, over the model's 5-token context"):
        fit_turns(msgs, words, 5, "error")
    with pytest.raises(RequestError, match="even with only the last exchange"):
        fit_turns(msgs, words, 2, "drop_oldest_turns")
