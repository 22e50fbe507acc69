"""NBD wire constants and message layouts (the numbers of the NBD protocol specification).

This module owns the vocabulary only: magic numbers, handshake/transmission flags, option and
reply codes, information types, commands, command flags, error values and the `struct` formats
of every fixed-size message. It has no behaviour; `handshake` and `transmission` speak it.
All integers on the wire are big-endian.

See docs/nbd.md §2, §3.
"""

from __future__ import annotations

import struct
from typing import Final

# -- magic numbers -----------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054            # "IHAVEOPT"; also the magic of every option
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# -- handshake flags (server, 16 bits) and client flags (32 bits) --------------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
KNOWN_CLIENT_FLAGS: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# -- transmission flags (16 bits) ----------------------------------------------------------------
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# -- options -----------------------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

# -- option replies ----------------------------------------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
_REP_ERR: Final = 1 << 31
REP_ERR_UNSUP: Final = _REP_ERR + 1
REP_ERR_POLICY: Final = _REP_ERR + 2
REP_ERR_INVALID: Final = _REP_ERR + 3
REP_ERR_PLATFORM: Final = _REP_ERR + 4
REP_ERR_TLS_REQD: Final = _REP_ERR + 5
REP_ERR_UNKNOWN: Final = _REP_ERR + 6
REP_ERR_SHUTDOWN: Final = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD: Final = _REP_ERR + 8
REP_ERR_TOO_BIG: Final = _REP_ERR + 9

# -- information types (NBD_OPT_INFO / NBD_OPT_GO) -----------------------------------------------
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# -- commands ----------------------------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

COMMAND_NAMES: Final = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC",
                        CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM", CMD_CACHE: "CACHE",
                        CMD_WRITE_ZEROES: "WRITE_ZEROES", CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# -- command flags -----------------------------------------------------------------------------
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# -- structured reply flags and chunk types ------------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_ERROR: Final = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2

# -- error values (the reply's error field) ------------------------------------------------------
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

# -- message layouts ---------------------------------------------------------------------------
# S: NBDMAGIC, IHAVEOPT, handshake flags
SERVER_GREETING: Final = struct.Struct(">QQH")
# C: client flags
CLIENT_FLAGS: Final = struct.Struct(">I")
# C: IHAVEOPT, option, length of option data
OPTION_HEADER: Final = struct.Struct(">QII")
# S: reply magic, option, reply type, length of reply data
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
# S: (reply to NBD_OPT_EXPORT_NAME) export size, transmission flags
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
EXPORT_NAME_ZEROES_BYTES: Final = 124
# NBD_REP_INFO payloads
INFO_EXPORT_PAYLOAD: Final = struct.Struct(">HQH")
INFO_BLOCK_SIZE_PAYLOAD: Final = struct.Struct(">HIII")
INFO_TYPE: Final = struct.Struct(">H")
# C: request magic, command flags, type, cookie, offset, length
REQUEST: Final = struct.Struct(">IHHQQI")
# S: simple reply magic, error, cookie
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
# S: structured reply magic, flags, type, cookie, payload length
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")
# Structured payload prefixes: OFFSET_DATA's offset; ERROR's error and message length
OFFSET_DATA_PREFIX: Final = struct.Struct(">Q")
ERROR_PREFIX: Final = struct.Struct(">IH")

MAX_STRING_BYTES: Final = 4096
