"""Secure aggregation: the server learns only the sum of the clients' vectors.

The protocol is Bonawitz et al. (CCS 2017), the complete-graph case of SecAgg+ (Bell et al.
2020), for an honest-but-curious server, with dropout robustness. Per round, after the
clients have trained (every message goes through the counted wire, kind ``secagg`` except the
masked vector, which replaces the ``parameters`` upload):

1. each client ``u`` sends two X25519 public keys: ``c_u`` (channel) and ``s_u`` (masks);
2. the server broadcasts the key table; ``u`` Shamir-shares (threshold ``t``) its mask
   secret key and a fresh self-mask seed ``b_u``, encrypts each client's shares with
   AES-GCM under ``HKDF(X25519(c_u, c_v))`` and uploads them;
3. the server forwards to ``v`` the shares addressed to it; ``v`` uploads
   ``y_v = x_v + PRG(b_v) + sum_{u in U2, u != v} ±PRG(HKDF(X25519(s_v, s_u)))  mod 2^64``
   (+ when ``v < u``), so pairwise masks cancel in the sum;
4. the server names who sent ``y`` (alive) and who did not (dropped); each alive client
   returns its share of ``b_u`` for the alive (its own included) and of the mask key for the
   dropped (never both for one client); with ``t`` of them the server removes the self masks
   and the dropped clients' pairwise masks. It never sees an unmasked ``x_v``.

Primitives come from ``cryptography`` (X25519, HKDF-SHA256, AES-GCM, AES-256-CTR as the mask
PRG) and ``pycryptodome`` (Shamir over GF(2^128), on 16-byte halves of each 32-byte secret),
none hand-rolled. Vectors are fixed point: ``round(x * 2^bits)`` in int64, summed mod 2^64.
Not covered: a server that forges public keys (the malicious-server variant needs a PKI), and
a client that masks a bad vector (secure aggregation hides inputs, so no norm screen can see
them: each coordinate is clamped to ``privacy.secagg_clamp`` before encoding, and a sum out of
that range is rejected).
"""

from __future__ import annotations

import secrets
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MessageError
from ..messages import PARAMETERS, SECAGG, SERVER, Message, client_name

KEY, SEED, NONCE, TAG = 32, 32, 12, 16
SHARE = 32  # two 16-byte Shamir shares (halves of a 32-byte secret)
CIPHER = NONCE + 2 * SHARE + TAG  # one encrypted pair of shares


# ----------------------------------------------------------------------------- primitives


def _x25519():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    return X25519PrivateKey, X25519PublicKey


def new_key():
    """A fresh X25519 private key (from the OS's randomness)."""
    return _x25519()[0].generate()


def public_bytes(key) -> bytes:
    return key.public_key().public_bytes_raw()


def agree(private, public: bytes, info: bytes) -> bytes:
    """``HKDF-SHA256(X25519(private, public), info)``: 32 bytes both ends derive alike."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if isinstance(private, bytes):
        private = _x25519()[0].from_private_bytes(private)
    try:
        shared = private.exchange(_x25519()[1].from_public_bytes(public))
    except ValueError:  # a low-order point: the all-zero shared secret
        raise MessageError("secure aggregation: invalid public key") from None
    return HKDF(hashes.SHA256(), KEY, None, info).derive(shared)


def valid_public_key(public: bytes) -> bool:
    """Whether ``public`` is an X25519 key that agrees with a fresh key (a low-order point
    gives the all-zero secret, which ``cryptography`` refuses): checked for every client's
    keys before the table goes out, so that no client can make the others' agreements fail."""
    try:
        agree(new_key(), public, b"check")
    except MessageError:
        return False
    return True


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 from a 32-byte seed: the AES-256-CTR keystream."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype=np.uint64)


def encrypt(key: bytes, data: bytes, aad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, data, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(blob[:NONCE], blob[NONCE:], aad)
    except InvalidTag:
        raise MessageError("secure aggregation: a share failed authentication") from None


def split_secret(secret: bytes, t: int, n: int) -> list[bytes]:
    """Shamir ``t``-of-``n`` shares of a 32-byte secret; share ``i`` (0-based) is 32 bytes."""
    from Crypto.Protocol.SecretSharing import Shamir

    halves = [Shamir.split(t, n, secret[h : h + 16], ssss=False) for h in (0, 16)]
    return [halves[0][i][1] + halves[1][i][1] for i in range(n)]


def combine(shares: dict[int, bytes]) -> bytes:
    """The secret from ``{0-based index: share}`` (at least the threshold of them)."""
    from Crypto.Protocol.SecretSharing import Shamir

    return b"".join(
        Shamir.combine([(i + 1, s[h : h + 16]) for i, s in shares.items()], ssss=False)
        for h in (0, 16)
    )


# ----------------------------------------------------------------------------- fixed point


def clamp(values: np.ndarray, bound: float) -> tuple[np.ndarray, int]:
    """``values`` clipped to ``±bound`` (float64) and how many were."""
    v = np.asarray(values, dtype=np.float64)
    return np.clip(v, -bound, bound), int(np.count_nonzero(np.abs(v) > bound))


def encode(values: np.ndarray, bits: int) -> np.ndarray:
    """``round(values * 2^bits)`` as uint64 (two's complement), to be summed mod 2^64."""
    return (
        np.rint(np.asarray(values, dtype=np.float64) * 2.0**bits).astype(np.int64).view(np.uint64)
    )


def decode(total: np.ndarray, bits: int) -> np.ndarray:
    """The float64 sum back from a uint64 (mod 2^64) sum of :func:`encode` outputs."""
    return total.view(np.int64).astype(np.float64) / 2.0**bits


def threshold(n: int, cfg) -> int:
    """Shares needed to reconstruct: ``privacy.secagg_threshold`` or a majority of ``n``."""
    return min(n, cfg.secagg_threshold or n // 2 + 1)


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def _ids(t: torch.Tensor | None, name: str) -> list[int]:
    if t is None or t.dtype != torch.int64 or t.dim() != 1 or len(t) > 100_000:
        raise MessageError(f"secure aggregation: {name} must be a 1-D int64 list of client ids")
    ids = t.tolist()
    if ids != sorted(set(ids)):
        raise MessageError(f"secure aggregation: {name} must be sorted and distinct")
    return ids


def _bytes_table(t: torch.Tensor | None, rows: int, width: int, name: str) -> list[bytes]:
    if t is None or t.dtype != torch.uint8 or tuple(t.shape) != (rows, width):
        raise MessageError(f"secure aggregation: {name} must be uint8 [{rows}, {width}]")
    return [bytes(r) for r in t.numpy()]


def _table(rows: list[bytes], width: int) -> torch.Tensor:
    """``rows`` of ``width`` bytes as uint8 [len(rows), width] (empty: [0, width])."""
    flat_bytes = np.frombuffer(b"".join(rows), dtype=np.uint8)
    return torch.tensor(flat_bytes.reshape(len(rows), width))


# ----------------------------------------------------------------------------- the client


@dataclass
class ClientSession:
    """One client's side of one round's secure sum of ``vector`` (uint64 [D])."""

    cfg: object  # the client's own [privacy] section: its threshold is not the server's to set
    rnd: int
    cid: int
    vector: np.ndarray
    c_key: object = field(default_factory=new_key)
    s_key: object = field(default_factory=new_key)
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(SEED))
    ids: list[int] = field(default_factory=list)
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # u -> (sk, b) shares
    revealed: bool = False
    mine: tuple[bytes, bytes] = (b"", b"")  # my shares of my own secrets
    closed: bool = False  # an unsafe or malformed request ended it

    def _msg(self, kind: str, tensors: dict, meta: dict | None = None) -> Message:
        return Message(kind, self.rnd, client_name(self.cid), SERVER, tensors, meta or {})

    def advertise(self, meta: dict) -> Message:
        """Step 1: the two public keys (uint8 [2, 32]) with the reply's metadata."""
        keys = [public_bytes(self.c_key), public_bytes(self.s_key)]
        return self._msg(SECAGG, {"keys": _table(keys, KEY)}, {**meta, "stage": "keys"})

    def reply(self, msg: Message) -> Message | None:
        """Steps 2-4 as a client answers them: None (no reply) for a request of another round
        or after a malformed or unsafe one, which ends the session."""
        if self.closed or msg.round != self.rnd:
            return None
        try:
            return self.answer(msg)
        except MessageError:
            self.closed = True
            return None

    def answer(self, msg: Message) -> Message:
        """Steps 2-4, by the message's ``stage``. A malformed or unsafe request raises
        :class:`MessageError`: the client then sends nothing more this round."""
        stage = msg.meta.get("stage")
        if stage == "shares" and not self.ids:
            return self._shares(msg)
        if stage == "masked" and self.ids and not self.held:
            return self._masked(msg)
        if stage == "unmask" and self.held and not self.revealed:
            return self._unmask(msg)
        raise MessageError(f"secure aggregation: unexpected stage {str(stage)[:20]!r}")

    def _shares(self, msg: Message) -> Message:
        ids = _ids(msg.tensors.get("ids"), "ids")
        n = len(ids)
        if self.cid not in ids or n < threshold(n, self.cfg) or threshold(n, self.cfg) < 2:
            raise MessageError(f"secure aggregation: {n} participants are too few")
        rows = _bytes_table(msg.tensors.get("keys"), n, 2 * KEY, "keys")
        self.ids = ids
        self.keys = {u: (r[:KEY], r[KEY:]) for u, r in zip(ids, rows, strict=True)}
        if self.keys[self.cid] != (public_bytes(self.c_key), public_bytes(self.s_key)):
            raise MessageError("secure aggregation: the key table does not hold my keys")
        t = threshold(n, self.cfg)
        sk = self.s_key.private_bytes_raw()
        sk_shares, b_shares = split_secret(sk, t, n), split_secret(self.seed, t, n)
        out = []
        for i, v in enumerate(ids):
            if v == self.cid:  # my own shares stay with me (I may reveal my seed's share)
                self.mine = (sk_shares[i], b_shares[i])
                out.append(bytes(CIPHER))
                continue
            key = agree(self.c_key, self.keys[v][0], b"fedtune secagg channel")
            aad = f"{self.rnd}:{self.cid}:{v}".encode()
            out.append(encrypt(key, sk_shares[i] + b_shares[i], aad))
        return self._msg(SECAGG, {"shares": _table(out, CIPHER)}, {"stage": "shares"})

    def _masked(self, msg: Message) -> Message:
        senders = _ids(msg.tensors.get("from"), "from")
        if self.cid not in senders or not set(senders) <= set(self.ids):
            raise MessageError("secure aggregation: shares from unknown clients")
        blobs = _bytes_table(msg.tensors.get("shares"), len(senders), CIPHER, "shares")
        for u, blob in zip(senders, blobs, strict=True):
            if u == self.cid:
                continue
            key = agree(self.c_key, self.keys[u][0], b"fedtune secagg channel")
            plain = decrypt(key, blob, f"{self.rnd}:{u}:{self.cid}".encode())
            self.held[u] = (plain[:SHARE], plain[SHARE:])
        self.held[self.cid] = self.mine
        y = self.vector + prg(self.seed, len(self.vector))
        for u in senders:
            if u != self.cid:
                mask = prg(agree(self.s_key, self.keys[u][1], b"fedtune secagg mask"), len(y))
                y = y + mask if self.cid < u else y - mask  # uint64: mod 2^64
        return self._msg(PARAMETERS, {"masked": torch.from_numpy(y.view(np.int64).copy())})

    def _unmask(self, msg: Message) -> Message:
        alive = _ids(msg.tensors.get("alive"), "alive")
        dropped = _ids(msg.tensors.get("dropped"), "dropped")
        if set(alive) & set(dropped) or not set(alive) | set(dropped) <= set(self.held):
            raise MessageError("secure aggregation: alive and dropped lists are inconsistent")
        if self.cid not in alive or len(alive) < threshold(len(self.ids), self.cfg):
            raise MessageError("secure aggregation: too few clients alive to unmask safely")
        self.revealed = True
        b = [self.held[u][1] for u in alive]  # the seeds' shares, mine included
        sk = [self.held[v][0] for v in dropped]
        tensors = {"b": _table(b, SHARE), "sk": _table(sk, SHARE)}
        return self._msg(SECAGG, tensors, {"stage": "unmask"})


# ----------------------------------------------------------------------------- the server


@dataclass
class SumResult:
    """A secure sum: ``total`` (uint64 [D], mod 2^64) over the ``clients`` whose vectors it
    holds; ``failed`` says why there is none."""

    total: np.ndarray | None
    clients: list[int]
    failed: str = ""


def server_sum(
    cfg, rnd: int, keys: dict[int, Message], dim: int
) -> Generator[dict[int, Message], dict[int, Message], SumResult]:
    """Steps 2-4 on the server, after step 1's ``keys`` replies; yields the messages to send
    and receives the replies (any subset: dropouts) like a framework's round."""
    p = cfg.privacy

    def send(cids, tensors_of, stage: str) -> dict[int, Message]:
        return {
            c: Message(SECAGG, rnd, SERVER, client_name(c), tensors_of(c), {"stage": stage})
            for c in cids
        }

    table: dict[int, bytes] = {}
    for c, m in keys.items():
        try:
            row = b"".join(_bytes_table(m.tensors.get("keys"), 2, KEY, "keys"))
        except MessageError:
            continue
        if valid_public_key(row[:KEY]) and valid_public_key(row[KEY:]):
            table[c] = row
    u1 = sorted(table)
    t = threshold(len(u1), p)
    if len(u1) < max(t, 2):
        return SumResult(None, [], f"{len(u1)} clients sent keys, fewer than {max(t, 2)}")
    ids = torch.tensor(u1, dtype=torch.int64)
    key_table = _table([table[c] for c in u1], 2 * KEY)
    replies = yield send(u1, lambda c: {"ids": ids, "keys": key_table}, "shares")
    shares: dict[int, list[bytes]] = {}
    for c, m in replies.items():
        if c in table and m.kind == SECAGG:
            try:
                shares[c] = _bytes_table(m.tensors.get("shares"), len(u1), CIPHER, "shares")
            except MessageError:
                continue
    u2 = sorted(shares)
    if len(u2) < t:
        return SumResult(None, [], f"{len(u2)} clients shared their keys, fewer than {t}")
    col = {c: i for i, c in enumerate(u1)}
    frm = torch.tensor(u2, dtype=torch.int64)
    replies = yield send(
        u2,
        lambda v: {"from": frm, "shares": _table([shares[u][col[v]] for u in u2], CIPHER)},
        "masked",
    )
    masked: dict[int, np.ndarray] = {}
    for c, m in replies.items():
        y = m.tensors.get("masked") if c in shares and m.kind == PARAMETERS else None
        if y is not None and y.dtype == torch.int64 and tuple(y.shape) == (dim,):
            masked[c] = y.numpy().view(np.uint64)
    u3 = sorted(masked)
    if len(u3) < t:
        return SumResult(None, [], f"{len(u3)} masked vectors arrived, fewer than {t}")
    dropped = [c for c in u2 if c not in masked]
    alive_t = torch.tensor(u3, dtype=torch.int64)
    dropped_t = torch.tensor(dropped, dtype=torch.int64)
    replies = yield send(u3, lambda c: {"alive": alive_t, "dropped": dropped_t}, "unmask")
    b_shares: dict[int, dict[int, bytes]] = {u: {} for u in u3}
    sk_shares: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
    for c, m in replies.items():
        if c not in masked or m.kind != SECAGG:
            continue
        try:
            b = _bytes_table(m.tensors.get("b"), len(u3), SHARE, "b")
            sk = _bytes_table(m.tensors.get("sk"), len(dropped), SHARE, "sk")
        except MessageError:
            continue
        for u, s in zip(u3, b, strict=True):
            b_shares[u][col[c]] = s
        for v, s in zip(dropped, sk, strict=True):
            sk_shares[v][col[c]] = s
    try:
        return SumResult(unmask(masked, b_shares, sk_shares, table, t, dim), u3)
    except (MessageError, ValueError) as e:  # too few shares, or shares that do not combine
        return SumResult(None, [], str(e)[:200])


def unmask(masked, b_shares, sk_shares, table, t: int, dim: int) -> np.ndarray:
    """The sum of the masked vectors minus the survivors' self masks and the dropped clients'
    pairwise masks (their keys rebuilt from ``t`` shares each)."""
    total = np.zeros(dim, dtype=np.uint64)
    for y in masked.values():
        total += y
    for shares in b_shares.values():
        if len(shares) < t:
            raise ValueError(f"only {len(shares)} shares of a self mask, need {t}")
        total -= prg(combine(dict(list(shares.items())[:t])), dim)
    for v, shares in sk_shares.items():
        if len(shares) < t:
            raise ValueError(f"only {len(shares)} shares of a dropped key, need {t}")
        sk = combine(dict(list(shares.items())[:t]))
        for u in masked:
            mask = prg(agree(sk, table[u][KEY:], b"fedtune secagg mask"), dim)
            total = total - mask if _sign(u, v) > 0 else total + mask
    return total


def flat(state: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """The tensors ``names`` of ``state`` as one float64 vector (in that order)."""
    return np.concatenate([state[n].detach().double().reshape(-1).cpu().numpy() for n in names])


def unflat(v: np.ndarray, like: dict[str, torch.Tensor], names: list[str]) -> dict:
    """Inverse of :func:`flat`: float32 tensors shaped like ``like``."""
    out, i = {}, 0
    for n in names:
        k = like[n].numel()
        t = torch.from_numpy(v[i : i + k].astype(np.float32)).reshape(like[n].shape)
        out[n] = t.to(like[n].device)
        i += k
    return out
