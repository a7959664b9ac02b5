#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora (deterministic; run from anywhere):

  corpus/extract/  tiny archives for fuzz_extract: valid tar, tar.gz, tar.zst
                   (multi-frame, skippable frame), tar.xz, tar.bz2, pax and GNU
                   long names, base-256 size; hostile ones: symlink, hard link,
                   FIFO, '..', bad checksum, a file in a directory's way,
                   truncated endings
  corpus/tar/      the uncompressed ones, for fuzz_tar
  corpus/decode/   compressed streams for fuzz_decode: gzip with optional
                   header fields and several members, zstd frames, xz, bzip2

Every file stays under 4 KiB. Needs only the standard library; uses the
`zstandard` package when installed (otherwise zstd frames of raw blocks).
"""
import bz2
import gzip
import lzma
import os
import shutil
import struct
import tarfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")
MTIME = 1700000000


# ---- tar ---------------------------------------------------------------------

def member(name, data=b"", type_=tarfile.REGTYPE, mode=0o644, linkname="", fmt=tarfile.USTAR_FORMAT):
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.mtime = MTIME
    info.uid = info.gid = 1000
    info.uname = info.gname = "hub"
    info.linkname = linkname
    info.size = len(data) if type_ in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    out = info.tobuf(fmt, "utf-8", "surrogateescape")
    if info.size:
        out += data + b"\0" * (-len(data) % 512)
    return out


def end():
    return b"\0" * 1024


def checksum(block):
    block = bytearray(block)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def raw_header(name, size_field, type_=b"0", ustar=True):
    """A ustar (or v7) header with a hand-written 12-byte size field."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0001750\0"
    h[116:124] = b"0001750\0"
    h[124:136] = size_field
    h[136:148] = b"%011o\0" % MTIME
    h[156:157] = type_
    if ustar:
        h[257:265] = b"ustar\x0000"
    return checksum(h)


def model_tar():
    """3.5 KiB: a directory, two files (one setuid, to be masked), the end."""
    return (member("model/", type_=tarfile.DIRTYPE, mode=0o755)
            + member("model/saved_model.pb", b"\x08\x01\x12\x0btensorflow" * 20)
            + member("model/variables/variables.data-00000-of-00001", bytes(range(256)) + bytes(44), mode=0o4755)
            + end())


def tars():
    long_dir = "model/" + "d" * 90 + "/" + "e" * 60
    t = {}
    t["model.tar"] = model_tar()
    t["pax_long_name.tar"] = member(long_dir + "/variables.index", b"pax", fmt=tarfile.PAX_FORMAT) + end()
    t["gnu_long_name.tar"] = member(long_dir + "/f", b"gnu", fmt=tarfile.GNU_FORMAT) + end()
    t["gnu_long_dir.tar"] = member(long_dir + "/", type_=tarfile.DIRTYPE, fmt=tarfile.GNU_FORMAT) + end()
    # pax size record overriding the header's size field
    pax = b"12 size=700\n"
    t["pax_size.tar"] = (raw_header(b"PaxHeaders/f", b"%011o\0" % len(pax), b"x") + pax + bytes(-len(pax) % 512)
                         + raw_header(b"f", b"00000000001\0") + bytes(700) + bytes(-700 % 512) + end())
    t["base256_size.tar"] = (raw_header(b"b256", b"\x80" + bytes(9) + struct.pack(">H", 600))
                             + bytes(600) + bytes(-600 % 512) + end())
    t["v7_dir.tar"] = raw_header(b"old/", b"00000000000\0", b"\0", ustar=False) + member("old/empty") + end()
    # hostile or broken
    t["hostile_symlink.tar"] = (member("model/", type_=tarfile.DIRTYPE) + member("model/link", type_=tarfile.SYMTYPE,
                                                                                    linkname="/etc")
                                + member("model/link/passwd", b"owned") + end())
    t["hostile_hardlink.tar"] = member("hard", type_=tarfile.LNKTYPE, linkname="/etc/passwd") + end()
    t["hostile_fifo.tar"] = member("fifo", type_=tarfile.FIFOTYPE) + end()
    t["hostile_dotdot.tar"] = member("model/../../escape", b"x") + end()
    t["hostile_absolute.tar"] = member("/tmp/absolute", b"x") + end()
    t["hostile_pax_dotdot.tar"] = member("../" * 40 + "pax-escape", b"x", fmt=tarfile.PAX_FORMAT) + end()
    t["file_then_dir.tar"] = member("a", b"file") + member("a/b", type_=tarfile.DIRTYPE) + end()
    bad = bytearray(model_tar())
    bad[0] ^= 1
    t["bad_checksum.tar"] = bytes(bad)
    t["one_zero_block.tar"] = model_tar()[:-512]
    t["no_end_marker.tar"] = model_tar()[:-1024]
    t["truncated_data.tar"] = model_tar()[:2000]
    return t


# ---- compressors -----------------------------------------------------------------

def gz(data, name=None, comment=None, extra=None, level=9):
    """A gzip member; zlib for the body, the header written here."""
    flg = (4 if extra is not None else 0) | (8 if name is not None else 0) | (16 if comment is not None else 0)
    hdr = b"\x1f\x8b\x08" + bytes([flg]) + struct.pack("<I", 0) + b"\x02\x03"
    if extra is not None:
        hdr += struct.pack("<H", len(extra)) + extra
    if name is not None:
        hdr += name + b"\0"
    if comment is not None:
        hdr += comment + b"\0"
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return hdr + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def zst(data, checksum=True):
    try:
        import zstandard
        return zstandard.ZstdCompressor(level=19, write_checksum=checksum).compress(data)
    except ImportError:  # raw blocks: valid, if not small
        out = b"\x28\xb5\x2f\xfd\x00\x38"  # no content size, 128 KiB window
        blocks = [data[i:i + 65536] for i in range(0, len(data), 65536)] or [b""]
        for i, b in enumerate(blocks):
            last = 1 if i == len(blocks) - 1 else 0
            out += struct.pack("<I", (len(b) << 3) | last)[:3] + b
        return out


def skippable(payload):
    return struct.pack("<II", 0x184D2A50, len(payload)) + payload


def xz(data):
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)


def bz(data):
    return bz2.compress(data, 9)


# ---- corpora ---------------------------------------------------------------------

def main():
    t = tars()
    model = t["model.tar"]
    half = len(model) // 2
    extract = dict(t)
    extract.update({
        "model.tar.gz": gzip.compress(model, mtime=0),
        "model_two_members.tar.gz": gz(model[:half]) + gz(model[half:], name=b"model.tar", comment=b"part 2"),
        "model_padded.tar.gz": gzip.compress(model, mtime=0) + bytes(64),
        "model.tar.zst": skippable(b"seek table?") + zst(model[:half]) + zst(model[half:], checksum=False),
        "model.tar.xz": xz(model),
        "model.tar.bz2": bz(model),
        "gnu_long_name.tar.gz": gz(t["gnu_long_name.tar"], name=b"gnu.tar"),
        "pax_long_name.tar.xz": xz(t["pax_long_name.tar"]),
        "hostile_symlink.tar.gz": gzip.compress(t["hostile_symlink.tar"], mtime=0),
        "hostile_dotdot.tar.zst": zst(t["hostile_dotdot.tar"]),
        "hostile_hardlink.tar.bz2": bz(t["hostile_hardlink.tar"]),
        "garbage_after_gzip.tar.gz": gzip.compress(model, mtime=0) + b"garbage",
    })
    decode = {
        "gzip_fields": gz(b"hello " * 100, name=b"n.tar", comment=b"c", extra=b"ab\x02\x00xy"),
        "gzip_members": gz(b"first") + gz(b"") + gz(bytes(3000), level=1),
        "gzip_stored": gz(bytes(range(256)) * 4, level=0),
        "zstd_frames": zst(b"a" * 1000) + skippable(b"") + zst(b"b" * 5000, checksum=False) + zst(b""),
        "zstd_checksum": zst(model[:3000]),
        "xz_two_streams": xz(b"one") + bytes(4) + xz(b"two"),
        "bzip2_two_streams": bz(b"one" * 100) + bz(b"two"),
        # Found by fuzz_decode: declares 17384 bytes, holds none (empty blocks, an empty last
        # block, the checksum of nothing); libzstd accepted it when fed in pieces.
        "zstd_short_content": b"\x28\xb5\x2f\xfd\x64\xe8\x42" + bytes(12) + b"\x01\x00\x00\x99\xe9\xd8\x51",
    }
    corpora = {"extract": extract, "tar": t, "decode": decode}
    for sub, files in corpora.items():
        d = os.path.join(OUT, sub)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in sorted(files.items()):
            assert len(data) < 4096, (sub, name, len(data))
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print("wrote %d files, %d bytes, under %s" % (sum(len(v) for v in corpora.values()), total, OUT))


if __name__ == "__main__":
    main()
