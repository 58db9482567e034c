"""
C{tenantedge store copy SRC DST}: move a store between a directory and
Redis (either way), so that a single box grows into a fleet, or a fleet
shrinks back, without a single re-issue: certificates, ACME accounts (key
and URL), the failure backoff, the limit windows and each hostname's
lifecycle record. Bytes are copied as they are (a certificate file's PEM,
the account key, the JSON state), so a round trip gives back identical
files; lifecycle records are copied record by record (a directory's
snapshot and journal become one hash field per name, and back).

It runs without a reactor, beside running servers: the directory side
writes atomically (0600), the Redis side one key per entry; copying into a
store already in use overwrites the entries it copies and nothing else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any, Protocol

import attrs

from .certificates import CertificateBundle, InvalidBundle
from .hostnames import InvalidHostname, normalize
from .journal import RecordJournal
from .redisstore import Keys
from .resp import BlockingRedis, RedisAddress
from .store import atomic_write, ensure_private_directory

__all__ = ["copy_store", "open_side", "Copied"]

#: The state files a directory store keeps beside the certificates, by label.
STATES = {"backoff": "backoff.json", "limits": "limits.json"}
#: The records kept one per name (L{tenantedge.journal}), by label.
RECORDS = {"lifecycle": "lifecycle.json"}


@attrs.frozen
class Account:
    """One CA's account: the key's PEM, and C{account.json}'s bytes if any."""

    key: bytes
    info: bytes | None


class Side(Protocol):
    def certificates(self) -> Iterator[tuple[str, bytes]]: ...
    def put_certificate(self, name: str, pem: bytes) -> None: ...
    def accounts(self) -> Iterator[tuple[str, Account]]: ...
    def put_account(self, slug: str, account: Account) -> None: ...
    def states(self) -> Iterator[tuple[str, bytes]]: ...
    def put_state(self, label: str, data: bytes) -> None: ...
    def records(self, label: str) -> dict[str, Any]: ...
    def put_records(self, label: str, records: dict[str, Any]) -> None: ...


@attrs.define
class DirectorySide:
    """A directory store, in txacme's format."""

    path: str

    def certificates(self) -> Iterator[tuple[str, bytes]]:
        for entry in sorted(os.listdir(self.path)):
            if not entry.endswith(".pem") or entry.startswith("."):
                continue
            name = entry[:-4]
            try:
                if normalize(name) != name:
                    continue
            except InvalidHostname:
                continue
            with open(os.path.join(self.path, entry), "rb") as f:
                yield name, f.read()

    def put_certificate(self, name: str, pem: bytes) -> None:
        _check_name(name)
        ensure_private_directory(self.path)
        atomic_write(os.path.join(self.path, name + ".pem"), pem)

    def accounts(self) -> Iterator[tuple[str, Account]]:
        root = os.path.join(self.path, "accounts")
        if not os.path.isdir(root):
            return
        for slug in sorted(os.listdir(root)):
            key_path = os.path.join(root, slug, "account-key.pem")
            if not os.path.exists(key_path):
                continue
            with open(key_path, "rb") as f:
                key = f.read()
            info = None
            info_path = os.path.join(root, slug, "account.json")
            if os.path.exists(info_path):
                with open(info_path, "rb") as f:
                    info = f.read()
            yield slug, Account(key, info)

    def put_account(self, slug: str, account: Account) -> None:
        _check_slug(slug)
        folder = os.path.join(self.path, "accounts", slug)
        ensure_private_directory(folder)
        atomic_write(os.path.join(folder, "account-key.pem"), account.key)
        if account.info is not None:
            atomic_write(os.path.join(folder, "account.json"), account.info)

    def states(self) -> Iterator[tuple[str, bytes]]:
        for label, file in STATES.items():
            path = os.path.join(self.path, file)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    yield label, f.read()

    def put_state(self, label: str, data: bytes) -> None:
        ensure_private_directory(self.path)
        atomic_write(os.path.join(self.path, STATES[label]), data)

    def records(self, label: str) -> dict[str, Any]:
        journal = RecordJournal(os.path.join(self.path, RECORDS[label]))
        journal.load()
        return dict(journal.items())

    def put_records(self, label: str, records: dict[str, Any]) -> None:
        ensure_private_directory(self.path)
        journal = RecordJournal(os.path.join(self.path, RECORDS[label]))
        journal.load()
        for name, record in sorted(records.items()):
            journal.update(name, _replaced_by(record))
        journal.compact()


@attrs.define
class RedisSide:
    """A Redis store (L{tenantedge.redisstore}'s layout)."""

    redis: BlockingRedis
    keys: Keys

    def certificates(self) -> Iterator[tuple[str, bytes]]:
        for raw in sorted(self.redis.execute("SMEMBERS", self.keys.names)):
            name = raw.decode("ascii")
            pem = self.redis.execute("HGET", self.keys.cert(name), "pem")
            if pem is not None:
                yield name, pem

    def put_certificate(self, name: str, pem: bytes) -> None:
        from .redisstore import _STORE

        self.redis.eval(_STORE, [self.keys.cert(name), self.keys.names, self.keys.events], [name, pem])

    def accounts(self) -> Iterator[tuple[str, Account]]:
        prefix = self.keys.account("")
        # SCAN, not KEYS (which blocks a shared Redis), matching this
        # prefix only: glob characters in it are escaped.
        found: set[bytes] = set()
        cursor = b"0"
        while True:
            cursor, keys = self.redis.execute("SCAN", cursor, "MATCH", _glob_escape(prefix) + "*", "COUNT", "1000")
            found.update(keys)
            if cursor in (b"0", 0, "0"):
                break
        for raw in sorted(found):
            slug = raw.decode()[len(prefix):]
            key, url, directory, thumbprint = self.redis.execute("HMGET", raw, "key", "url", "directory",
                                                                 "thumbprint")
            if key is None:
                continue
            info = None
            if url is not None:
                # account.json exactly as AccountStore.save_url writes it.
                info = json.dumps({"url": url.decode(), "directory": (directory or b"").decode(),
                                   "key": (thumbprint or b"").decode()}, indent=1).encode()
            yield slug, Account(key, info)

    def put_account(self, slug: str, account: Account) -> None:
        fields: list[Any] = ["key", account.key]
        if account.info is not None:
            info = json.loads(account.info)
            fields += ["url", info.get("url", ""), "directory", info.get("directory", ""),
                       "thumbprint", info.get("key", "")]
        self.redis.execute("HSET", self.keys.account(slug), *fields)

    def states(self) -> Iterator[tuple[str, bytes]]:
        for label in STATES:
            data = self.redis.execute("HGET", self.keys.state(label), "data")
            if data is not None:
                yield label, data

    def records(self, label: str) -> dict[str, Any]:
        flat = self.redis.execute("HGETALL", self.keys.records(label)) or []
        records: dict[str, Any] = {}
        for name, value in zip(flat[0::2], flat[1::2]):
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if isinstance(record, dict):
                records[name.decode("utf-8", "replace")] = record
        return records

    def put_records(self, label: str, records: dict[str, Any]) -> None:
        items = sorted(records.items())
        for start in range(0, len(items), 500):
            fields: list[Any] = []
            for name, record in items[start:start + 500]:
                fields += [name, json.dumps(record)]
            self.redis.execute("HSET", self.keys.records(label), *fields)
        self.redis.execute("PUBLISH", self.keys.events, f"record {label}")  # running nodes read them all again

    def put_state(self, label: str, data: bytes) -> None:
        json.loads(data)  # refuse to copy a file that is not JSON
        self.redis.transaction([["HSET", self.keys.state(label), "data", data],
                                ["HINCRBY", self.keys.state(label), "version", 1],
                                ["PUBLISH", self.keys.events, f"state {label}"]])


def _replaced_by(record: dict[str, Any]) -> Any:
    return lambda current: record


def open_side(store: str, password_file: str | None = None, ca: str | None = None) -> DirectorySide | RedisSide:
    """A directory path or a C{redis://} URL, opened for copying."""
    if store.startswith(("redis://", "rediss://")):
        address = RedisAddress.from_url(store, password_file=password_file, ca=ca)
        return RedisSide(BlockingRedis(address), Keys(address.prefix))
    if not os.path.isdir(store):
        raise ValueError(f"no store at {store}")
    return DirectorySide(os.path.abspath(store))


@attrs.frozen
class Copied:
    """How much was copied, for the command's summary."""

    certificates: int
    accounts: int
    states: int
    skipped: tuple[str, ...]
    #: Lifecycle records copied.
    records: int = 0

    def to_json(self) -> dict[str, Any]:
        """The summary as C{store copy --json} prints it."""
        return {"certificates": self.certificates, "accounts": self.accounts, "states": self.states,
                "records": self.records, "skipped": list(self.skipped)}


def copy_store(source: Side, target: Side) -> Copied:
    """
    Copy everything; a certificate that does not parse is skipped (named
    in the result), never copied into a store that would serve it.
    """
    certificates = accounts = states = 0
    skipped = []
    for name, pem in source.certificates():
        try:
            CertificateBundle.from_pem(pem)
        except InvalidBundle:
            skipped.append(name)
            continue
        target.put_certificate(name, pem)
        certificates += 1
    for slug, account in source.accounts():
        target.put_account(slug, account)
        accounts += 1
    for label, data in source.states():
        target.put_state(label, data)
        states += 1
    records = 0
    for label in RECORDS:
        found = source.records(label)
        if found:
            target.put_records(label, found)
            records += len(found)
    return Copied(certificates, accounts, states, tuple(skipped), records)


_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def _glob_escape(text: str) -> str:
    """C{text} as a literal in a Redis glob pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _check_name(name: str) -> None:
    """A name read from Redis becomes a file name: it must be a canonical host name, nothing else."""
    try:
        if normalize(name) == name:
            return
    except InvalidHostname:
        pass
    raise ValueError(f"refusing to copy a certificate stored under {name!r}: not a canonical host name")


def _check_slug(slug: str) -> None:
    """An account's slug becomes a directory name: no separators, no dot files."""
    if not _SLUG.match(slug):
        raise ValueError(f"refusing to copy an ACME account stored under {slug!r}")
