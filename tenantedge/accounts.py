"""
ACME account keys and URLs, kept in the store so that a restart reuses the
same account: C{<store>/accounts/<ca>/account-key.pem} (0600) and
C{account.json} (the account URL).
"""

from __future__ import annotations

import json
import os
import re

import attrs
import josepy as jose
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hyperlink import URL
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IAccountStore
from .store import StoreError, atomic_write, check_private_file, ensure_private_directory

__all__ = ["AccountStore", "account_directory"]


def account_directory(store: str, directory_url: str) -> str:
    """
    Where one CA's account lives: one folder per directory URL, named by
    its host, port and path (never anything that could escape the store).
    """
    url = URL.from_text(directory_url)
    slug = f"{url.host}_{url.port}" + "_".join([""] + [p for p in url.path if p])
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", slug)
    slug = re.sub(r"\.{2,}", "_", slug).strip(".") or "ca"
    return os.path.join(store, "accounts", slug)


@implementer(IAccountStore)
@attrs.define
class AccountStore:
    """
    @ivar path: the account's folder.
    """

    path: str
    _log = Logger()

    @property
    def key_path(self) -> str:
        return os.path.join(self.path, "account-key.pem")

    @property
    def info_path(self) -> str:
        return os.path.join(self.path, "account.json")

    def load_or_create_key(self) -> jose.JWK:
        """
        The account key (ECDSA P-256), created once, 0600.

        @raise StoreError: if the key file is readable by others or corrupt.
        """
        ensure_private_directory(self.path)
        if not os.path.exists(self.key_path):
            new_key = ec.generate_private_key(ec.SECP256R1())
            atomic_write(
                self.key_path,
                new_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
            )
            self._log.info("created ACME account key {path}", path=self.key_path)
        check_private_file(self.key_path)
        try:
            with open(self.key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise StoreError(f"cannot load the ACME account key {self.key_path}: {e}") from None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return jose.JWKEC(key=key)
        return jose.JWKRSA(key=key)

    def load_url(self, key: jose.JWK) -> str | None:
        """
        The remembered account URL, if it belongs to this key (an account
        key that was replaced must register again, not reuse the old URL).
        """
        try:
            with open(self.info_path, "rb") as f:
                info = json.load(f)
            url, thumbprint = info.get("url"), info.get("key")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            self._log.warn("ignoring unreadable {file}: {error}", file=self.info_path, error=str(e))
            return None
        if thumbprint != _thumbprint(key):
            return None
        return url if isinstance(url, str) and url else None

    def save_url(self, url: str, directory_url: str, key: jose.JWK) -> Deferred[None]:
        info = {"url": url, "directory": directory_url, "key": _thumbprint(key)}
        atomic_write(self.info_path, json.dumps(info, indent=1).encode())
        return succeed(None)


def _thumbprint(key: jose.JWK) -> str:
    return jose.b64encode(key.thumbprint()).decode("ascii")
