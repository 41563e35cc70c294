"""nf_tables over netlink: the reads and the few writes that the nftables traffic manager makes itself.

nft 1.0.6 (Debian 12, the image's) reads more of the ruleset than a command needs: ``nft list table``
fetches every chain of every table, because the kernel does not filter chain dumps by table, and
``add table`` with a comment, ``add rule``, ``delete table`` and ``delete chain`` fetch every table's
chains and sets. Beside kube-proxy's nftables rules for 10,000 Services that is 41 ms of CPU for a
listing and a 38 MB child for such a write, over the manifest's 50 MiB with the daemon itself. Reading
a table, its chains and its rules here costs the same whatever else is in the ruleset (the kernel
filters rule dumps by table, and single objects are fetched by name), and so do the table's creation
and the deletions; ``nft -f -`` writes the chains and their rules (cheap commands in nft: ``flush
table``, and ``add chain`` with the rules in its block).
"""

from __future__ import annotations

import errno
import socket
import struct

from ..netlink import NLM_F_ACK, NLM_F_CREATE, Netlink, NetlinkError, Packed, parse_attrs

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_GETCHAIN, NFT_MSG_GETRULE = 4, 7
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFTA_TABLE_USE, NFTA_TABLE_USERDATA = 1, 2, 3, 6
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY = 1, 2, 3, 4, 5
NFTA_CHAIN_TYPE, NFTA_CHAIN_USERDATA = 7, 12
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTNL_UDATA_COMMENT = 0  # the comment's type in an object's user data, as nft writes it
SOCKET_TIMEOUT = 10.0  # seconds; the kernel answers at once, this only bounds a wait that should not happen

_NFGENMSG = struct.Struct(">BBH")  # family, version, resource id (big endian)
_ATTR = struct.Struct("=HH")


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return _ATTR.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def text(value: str) -> bytes:
    """A string attribute's value: the text and a NUL."""
    return value.encode() + b"\0"


def attrs(body: bytes) -> dict[int, bytes]:
    """The attributes of a message body (after its nfgenmsg), by type."""
    return parse_attrs(body, _NFGENMSG.size, len(body))


def comment(body: bytes) -> str | None:
    """The comment in an object's user data (as nft writes it), or None."""
    data = body
    while len(data) >= 2:
        kind, length = data[0], data[1]
        if kind == NFTNL_UDATA_COMMENT:
            return data[2:2 + length].rstrip(b"\0").decode(errors="replace")
        data = data[2 + length:]
    return None


class NfTables(Netlink):
    """A NETLINK_NETFILTER socket in the process's network namespace (or ``sock``, an already bound one)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
        sock.settimeout(SOCKET_TIMEOUT)
        super().__init__(sock)

    @staticmethod
    def message(msg_type: int, family: int, *attributes: bytes, flags: int = 0) -> Packed:
        """An nf_tables request of ``family`` (socket.AF_INET for ``ip``, AF_INET6 for ``ip6``)."""
        body = _NFGENMSG.pack(family, 0, 0) + b"".join(attributes)
        return Packed((NFNL_SUBSYS_NFTABLES << 8) | msg_type, flags, body)

    def table(self, family: int, name: str) -> bytes | None:
        """A table, or None if there is none.

        Objects are returned as their message body with the ruleset generation (the nfgenmsg resource
        id, which every change anywhere in the ruleset moves) zeroed, so that two answers compare equal
        while the object did not change."""
        return self._get(NFT_MSG_GETTABLE, family, attr(NFTA_TABLE_NAME, text(name)))

    def chain(self, family: int, table: str, name: str) -> bytes | None:
        """A chain, or None if there is none (see :meth:`table`)."""
        return self._get(NFT_MSG_GETCHAIN, family, attr(NFTA_CHAIN_TABLE, text(table)),
                         attr(NFTA_CHAIN_NAME, text(name)))

    def _get(self, msg_type: int, family: int, *attributes: bytes) -> bytes | None:
        try:
            found = [_stable(buf[off + 16:off + length])
                     for buf, off, length in self._answer(self.message(msg_type, family, *attributes), NLM_F_ACK)]
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return found[0] if found else None

    def rules(self, family: int, table: str) -> list[bytes]:
        """Every rule of a table, in order, each as in :meth:`table` (the kernel dumps only that table's)."""
        return self._dump(self.message(NFT_MSG_GETRULE, family, attr(NFTA_RULE_TABLE, text(table))),
                          lambda buf, off, length: _stable(buf[off + 16:off + length]))

    def commit(self, requests: list[Packed]) -> None:
        """Send the requests as one transaction: all of them take effect, or none; raises NetlinkError."""
        batch = _NFGENMSG.pack(socket.AF_UNSPEC, 0, NFNL_SUBSYS_NFTABLES)
        begin, encoded = self._encode(Packed(NFNL_MSG_BATCH_BEGIN, 0, batch), 0)
        data = bytearray(encoded)
        seqs = []
        for req in requests:
            seq, encoded = self._encode(req, NLM_F_ACK)
            seqs.append(seq)
            data += encoded
        data += self._encode(Packed(NFNL_MSG_BATCH_END, 0, batch), 0)[1]
        self.sock.send(bytes(data))
        # The kernel handles the batch while sending; each request's acknowledgement (or error) follows.
        # An error answers the batch-begin message when the batch fails as a whole (no nf_tables, the
        # commit itself failed, no memory for the answers): the requests' answers may then never come.
        failed = 0
        for seq, code, _, _, _, _ in self._replies(seqs[-1]):
            if seq == begin and code:
                raise NetlinkError(code)
            if seq in seqs and code and not failed:
                failed = code
        if failed:
            raise NetlinkError(failed)


def _stable(body: bytes) -> bytes:
    return body[:2] + b"\0\0" + body[4:]


def new_table(family: int, name: str, note: str) -> Packed:
    """Create a table with a comment (nothing happens if it exists)."""
    return NfTables.message(NFT_MSG_NEWTABLE, family, attr(NFTA_TABLE_NAME, text(name)),
                            attr(NFTA_TABLE_FLAGS, struct.pack(">I", 0)),
                            attr(NFTA_TABLE_USERDATA, bytes((NFTNL_UDATA_COMMENT, len(note) + 1)) + text(note)),
                            flags=NLM_F_CREATE)


def delete_table(family: int, name: str) -> Packed:
    """Delete a table with everything in it."""
    return NfTables.message(NFT_MSG_DELTABLE, family, attr(NFTA_TABLE_NAME, text(name)))

