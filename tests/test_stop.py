"""Stop strings over incrementally detokenized text, and how much text to hold back."""

from __future__ import annotations

from kvrun.sampling.stop import StopMatch, find_stop, stop_holdback


def feed(pieces: list[str], stops: list[str], include: bool) -> tuple[StopMatch | None, list[str]]:
    """Detokenize piece by piece like the engine: check stops, stream what is safe."""
    text, streamed = "", []
    sent = 0
    for piece in pieces:
        text += piece
        match = find_stop(text, len(piece), stops, include)
        if match is not None:
            streamed.append(match.text[sent:])
            return match, streamed
        safe = len(text) - stop_holdback(text, stops)
        if safe > sent:
            streamed.append(text[sent:safe])
            sent = safe
    return None, streamed


def test_no_match() -> None:
    assert find_stop("hello world", 5, ["###", "\n\n"], False) is None
    assert find_stop("", 0, ["x"], False) is None


def test_match_in_new_text_is_cut_before_the_stop() -> None:
    assert find_stop("Hello###tail", 7, ["###"], False) == StopMatch(stop="###", text="Hello")


def test_include_stop_str_keeps_it_and_drops_what_follows() -> None:
    assert find_stop("Hello###tail", 7, ["###"], True) == StopMatch(stop="###", text="Hello###")


def test_stop_split_across_tokens() -> None:
    # "#" arrived earlier; "##" completes the stop now.
    assert find_stop("Hi ###", 2, ["###"], False) == StopMatch(stop="###", text="Hi ")
    assert find_stop("Hi ###", 1, ["###"], True) == StopMatch(stop="###", text="Hi ###")


def test_match_only_in_old_text_is_not_reported_again() -> None:
    assert find_stop("a###bcd", 3, ["###"], False) is None
    # The match must reach into the new text: "###" ends at index 4, the new text starts at 4.
    assert find_stop("a###b", 1, ["###"], False) is None
    assert find_stop("a###b", 2, ["###"], False) == StopMatch(stop="###", text="a")


def test_earliest_of_several_stops_wins() -> None:
    assert find_stop("one END two STOP", 16, ["STOP", "END"], False) == StopMatch(
        stop="END", text="one "
    )
    # Same start: the stop listed first wins.
    assert find_stop("xxABC", 3, ["ABC", "AB"], True) == StopMatch(stop="ABC", text="xxABC")
    assert find_stop("xxABC", 3, ["AB", "ABC"], True) == StopMatch(stop="AB", text="xxAB")


def test_num_new_chars_larger_than_text() -> None:
    assert find_stop("ab", 10, ["a"], False) == StopMatch(stop="a", text="")


def test_holdback_is_longest_suffix_that_is_a_proper_prefix() -> None:
    assert stop_holdback("Hello #", ["###"]) == 1
    assert stop_holdback("Hello ##", ["###"]) == 2
    assert stop_holdback("Hello", ["###"]) == 0
    assert stop_holdback("abc", ["bcd", "cz"]) == 2
    assert stop_holdback("abc", ["c"]) == 0  # a whole stop is a match, not a prefix
    assert stop_holdback("x<", ["</s>", "<|end|>"]) == 1
    assert stop_holdback("<|en", ["</s>", "<|end|>"]) == 4
    assert stop_holdback("", ["abc"]) == 0
    assert stop_holdback("ab", []) == 0


def test_streaming_never_shows_part_of_a_stop() -> None:
    match, streamed = feed(["Hel", "lo #", "#", "# bye"], ["###"], False)
    assert match == StopMatch(stop="###", text="Hello ")
    assert streamed == ["Hel", "lo ", ""]
    assert "".join(streamed) == "Hello "


def test_streaming_releases_a_false_start() -> None:
    match, streamed = feed(["a#", "#b", "c"], ["###"], False)
    assert match is None
    assert streamed == ["a", "##b", "c"]


def test_streaming_include_stop_str() -> None:
    match, streamed = feed(["Hi", " <", "/s", "> more"], ["</s>", "\n"], True)
    assert match == StopMatch(stop="</s>", text="Hi </s>")
    assert "".join(streamed) == "Hi </s>"
    assert streamed == ["Hi", " ", "</s>"]
