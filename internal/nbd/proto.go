package nbd

import "strconv"

// Wire constants of the NBD protocol, as specified in
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.

const (
	nbdMagic       = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic       = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic  = 0x0003e889045565a9
	requestMagic   = 0x25609513
	simpleMagic    = 0x67446698
	structMagic    = 0x668e33ef
	maxOptionReply = 64 << 10 // larger option replies are treated as hostile
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1
)

// Option codes.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optSetMetaContext  = 10
)

// Option reply types.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repFlagError   = 1 << 31

	repErrUnsup          = repFlagError | 1
	repErrPolicy         = repFlagError | 2
	repErrInvalid        = repFlagError | 3
	repErrPlatform       = repFlagError | 4
	repErrTLSReqd        = repFlagError | 5
	repErrUnknown        = repFlagError | 6
	repErrShutdown       = repFlagError | 7
	repErrBlockSizeReqd  = repFlagError | 8
	repErrTooBig         = repFlagError | 9
	repErrExtHeaderReqd  = repFlagError | 10
	infoExport           = 0
	infoName             = 1
	infoDescription      = 2
	infoBlockSize        = 3
	maxMetaContextLength = 4096 // NBD spec limit for context names
)

// Command types.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Structured reply chunk types and flags.
const (
	replyFlagDone = 1 << 0

	chunkNone           = 0
	chunkOffsetData     = 1
	chunkOffsetHole     = 2
	chunkBlockStatus    = 5
	chunkBlockStatusExt = 6
	chunkErrorFlag      = 1 << 15
	chunkError          = chunkErrorFlag | 1
	chunkErrorOffset    = chunkErrorFlag | 2
)

// TransmissionFlags are the per-export flags a server announces at the end
// of the handshake.
type TransmissionFlags uint16

// Transmission flag bits.
const (
	FlagHasFlags        TransmissionFlags = 1 << 0
	FlagReadOnly        TransmissionFlags = 1 << 1
	FlagSendFlush       TransmissionFlags = 1 << 2
	FlagSendFUA         TransmissionFlags = 1 << 3
	FlagRotational      TransmissionFlags = 1 << 4
	FlagSendTrim        TransmissionFlags = 1 << 5
	FlagSendWriteZeroes TransmissionFlags = 1 << 6
	FlagSendDF          TransmissionFlags = 1 << 7
	FlagCanMultiConn    TransmissionFlags = 1 << 8
	FlagSendResize      TransmissionFlags = 1 << 9
	FlagSendCache       TransmissionFlags = 1 << 10
	FlagSendFastZero    TransmissionFlags = 1 << 11
)

// ReadOnly reports whether the export refuses writes.
func (f TransmissionFlags) ReadOnly() bool { return f&FlagReadOnly != 0 }

// CanFlush reports whether the server accepts NBD_CMD_FLUSH.
func (f TransmissionFlags) CanFlush() bool { return f&FlagSendFlush != 0 }

// CanFUA reports whether the server honours the FUA command flag.
func (f TransmissionFlags) CanFUA() bool { return f&FlagSendFUA != 0 }

// CanTrim reports whether the server accepts NBD_CMD_TRIM.
func (f TransmissionFlags) CanTrim() bool { return f&FlagSendTrim != 0 }

// CanWriteZeroes reports whether the server accepts NBD_CMD_WRITE_ZEROES.
func (f TransmissionFlags) CanWriteZeroes() bool { return f&FlagSendWriteZeroes != 0 }

// CanFastZero reports whether the server honours NBD_CMD_FLAG_FAST_ZERO.
func (f TransmissionFlags) CanFastZero() bool { return f&FlagSendFastZero != 0 }

// CanMultiConn reports whether several connections to the export see a
// consistent view (a flush on one covers writes acknowledged on another).
func (f TransmissionFlags) CanMultiConn() bool { return f&FlagCanMultiConn != 0 }

// CmdFlags modify a single command.
type CmdFlags uint16

// Command flag bits.
const (
	// CmdFlagFUA asks the server to persist a write before replying.
	CmdFlagFUA CmdFlags = 1 << 0
	// CmdFlagNoHole asks WriteZeroes to allocate rather than punch a hole.
	CmdFlagNoHole CmdFlags = 1 << 1
	// CmdFlagDF asks for a read reply in a single chunk.
	CmdFlagDF CmdFlags = 1 << 2
	// CmdFlagReqOne asks BlockStatus for a single extent per context.
	CmdFlagReqOne CmdFlags = 1 << 3
	// CmdFlagFastZero asks WriteZeroes to fail rather than be slow.
	CmdFlagFastZero CmdFlags = 1 << 4
)

// Block status flags of the "base:allocation" meta context.
const (
	// StateHole marks an extent that is not allocated on the server.
	StateHole = 1 << 0
	// StateZero marks an extent that reads as zeros.
	StateZero = 1 << 1
)

// StateDirty is the flag of a "qemu:dirty-bitmap:NAME" meta context extent
// whose blocks changed since the bitmap was cleared.
const StateDirty = 1 << 0

// Well-known meta context names.
const (
	MetaBaseAllocation = "base:allocation"
	// MetaDirtyBitmapPrefix followed by a bitmap name is the QEMU meta
	// context exposing that dirty bitmap.
	MetaDirtyBitmapPrefix = "qemu:dirty-bitmap:"
)

func cmdName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disconnect"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write-zeroes"
	case cmdBlockStatus:
		return "block-status"
	}
	return "command " + strconv.Itoa(int(typ))
}

func optName(opt uint32) string {
	switch opt {
	case optExportName:
		return "NBD_OPT_EXPORT_NAME"
	case optAbort:
		return "NBD_OPT_ABORT"
	case optList:
		return "NBD_OPT_LIST"
	case optInfo:
		return "NBD_OPT_INFO"
	case optGo:
		return "NBD_OPT_GO"
	case optStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case optSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	}
	return "option " + strconv.FormatUint(uint64(opt), 10)
}

func repErrName(rep uint32) string {
	switch rep {
	case repErrUnsup:
		return "unsupported"
	case repErrPolicy:
		return "denied by server policy"
	case repErrInvalid:
		return "invalid"
	case repErrPlatform:
		return "unsupported on the server's platform"
	case repErrTLSReqd:
		return "TLS required"
	case repErrUnknown:
		return "unknown export"
	case repErrShutdown:
		return "server shutting down"
	case repErrBlockSizeReqd:
		return "block size negotiation required"
	case repErrTooBig:
		return "request too big"
	case repErrExtHeaderReqd:
		return "extended headers required"
	}
	return "error reply " + strconv.FormatUint(uint64(rep), 10)
}
