"""A step's output within its cap: head and tail of each stream, and the marker between them."""

from __future__ import annotations

from tickle.agent.output import CappedStream, cut_marker, cut_to_cap


def stream(data: bytes, cap: int, chunk: int = 7) -> CappedStream:
    s = CappedStream(cap)
    for i in range(0, len(data), chunk):
        s.write(data[i : i + chunk])
    return s


def test_output_within_the_cap_is_kept_whole() -> None:
    out, err = cut_to_cap(stream(b"a" * 60, 100), stream(b"b" * 40, 100), 100)
    assert (out, err) == ("a" * 60, "b" * 40)


def test_two_large_streams_share_the_cap_half_each_with_both_ends() -> None:
    data = bytes(range(48, 58)) * 100  # "0123456789" x 100
    out, err = cut_to_cap(stream(data, 100), stream(data, 100), 100)
    for text in (out, err):
        assert text == data[:25].decode() + cut_marker(950) + data[-25:].decode()


def test_a_small_stream_leaves_its_share_to_the_other() -> None:
    out, err = cut_to_cap(stream(b"x" * 1000, 100), stream(b"e" * 10, 100), 100)
    assert err == "e" * 10
    assert out == "x" * 45 + cut_marker(910) + "x" * 45


def test_a_stream_barely_over_its_budget_is_cut_from_what_it_kept() -> None:
    # 60 bytes, all kept (head 50, tail 10); its budget is half the cap as stderr is large: its
    # last 25 bytes come partly from what the head kept
    data = bytes(range(65, 65 + 60))
    out, err = cut_to_cap(stream(data, 100), stream(b"e" * 500, 100), 100)
    assert out == data[:25].decode() + cut_marker(10) + data[-25:].decode()
    assert err == "e" * 25 + cut_marker(450) + "e" * 25


def test_nul_and_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    out, _ = cut_to_cap(stream(b"a\x00b\xffc", 100), stream(b"", 100), 100)
    assert out == "a\ufffdb\ufffdc"
