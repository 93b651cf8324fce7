"""The checksum is the lowercase hex SHA-256 of the stored bytes, however they are fed in."""

from __future__ import annotations

from storage.checksum import sha256_hex, sha256_stream

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sha256_hex_is_the_lowercase_hex_digest() -> None:
    assert sha256_hex(b"abc") == ABC_SHA256


def test_sha256_stream_matches_hashing_the_concatenated_bytes_and_counts_them() -> None:
    assert sha256_stream([b"a", b"", b"bc"]) == (ABC_SHA256, 3)


def test_sha256_stream_of_nothing_is_the_empty_digest() -> None:
    assert sha256_stream(iter(())) == (EMPTY_SHA256, 0)
    assert sha256_hex(b"") == EMPTY_SHA256
