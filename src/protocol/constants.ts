// Wire-protocol constants, named as in the PostgreSQL protocol documentation
// ("Message Formats"), so the session code reads like the spec.

/** Startup-phase request codes (the int32 after the length of an untyped packet). */
export const PROTOCOL_VERSION_3_0 = 196608; // 3 << 16
export const SSL_REQUEST_CODE = 80877103;
export const GSSENC_REQUEST_CODE = 80877104;
export const CANCEL_REQUEST_CODE = 80877102;

/** PostgreSQL's own bound on a startup packet after its length field (MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP_PACKET_BYTES = 10_000;

/**
 * The largest message a client may send before authentication completes: PostgreSQL
 * reads a password or SASL message up to PG_MAX_AUTH_TOKEN_LENGTH (65535) bytes of
 * payload, plus the length field itself.
 */
export const MAX_AUTH_MESSAGE_BYTES = 65_535 + 4;

/** Authentication request codes (the int32 after an 'R' message's length). */
export const AuthenticationCode = {
  Ok: 0,
  SASL: 10,
} as const;

/** The SASL mechanism that binds SCRAM to the TLS channel the server sees. */
export const SCRAM_SHA_256_PLUS = 'SCRAM-SHA-256-PLUS';

/** Frontend (client to server) message type bytes. */
export const Frontend = {
  Bind: 0x42, // 'B'
  Close: 0x43, // 'C'
  CopyData: 0x64, // 'd'
  CopyDone: 0x63, // 'c'
  CopyFail: 0x66, // 'f'
  Describe: 0x44, // 'D'
  Execute: 0x45, // 'E'
  Flush: 0x48, // 'H'
  FunctionCall: 0x46, // 'F'
  Parse: 0x50, // 'P'
  Password: 0x70, // 'p' (also SASLInitialResponse, SASLResponse, GSSResponse)
  Query: 0x51, // 'Q'
  Sync: 0x53, // 'S'
  Terminate: 0x58, // 'X'
} as const;

/** Backend (server to client) message type bytes. */
export const Backend = {
  Authentication: 0x52, // 'R'
  BackendKeyData: 0x4b, // 'K'
  BindComplete: 0x32, // '2'
  CloseComplete: 0x33, // '3'
  CommandComplete: 0x43, // 'C'
  CopyBothResponse: 0x57, // 'W'
  CopyData: 0x64, // 'd'
  CopyDone: 0x63, // 'c'
  CopyInResponse: 0x47, // 'G'
  CopyOutResponse: 0x48, // 'H'
  DataRow: 0x44, // 'D'
  EmptyQueryResponse: 0x49, // 'I'
  ErrorResponse: 0x45, // 'E'
  FunctionCallResponse: 0x56, // 'V'
  NegotiateProtocolVersion: 0x76, // 'v'
  NoData: 0x6e, // 'n'
  NoticeResponse: 0x4e, // 'N'
  NotificationResponse: 0x41, // 'A'
  ParameterDescription: 0x74, // 't'
  ParameterStatus: 0x53, // 'S'
  ParseComplete: 0x31, // '1'
  PortalSuspended: 0x73, // 's'
  ReadyForQuery: 0x5a, // 'Z'
  RowDescription: 0x54, // 'T'
} as const;

/**
 * The transaction status a ReadyForQuery reports, as its byte reads: 'I' idle, 'T'
 * in a transaction block, 'E' in a failed one. The one type for it everywhere
 * (readyForQueryStatus decodes it, encodeReadyForQuery writes it).
 */
export type TransactionStatus = 'I' | 'T' | 'E';

/** Every typed message starts with its type byte and an int32 length (which counts itself, not the type). */
export const MESSAGE_HEADER_BYTES = 5;

/** The SQLSTATEs pgwarden itself originates (docs/api.md and README.md name them). */
export const SqlState = {
  InsufficientPrivilege: '42501', // shape blocked by a rule
  ConfigurationLimitExceeded: '53400', // shape shed
  ConnectionFailure: '08006', // upstream unreachable or lost
  ProtocolViolation: '08P01', // malformed or oversized client message
  AdminShutdown: '57P01', // pgwarden is shutting down
  CannotConnectNow: '57P03', // pgwarden is draining and accepts no new sessions
  TooManyConnections: '53300', // max_client_connections reached
  QueryCanceled: '57014', // authentication did not finish within startup_timeout_ms
} as const;

/** ErrorResponse / NoticeResponse field type bytes we read or write. */
export const ErrorField = {
  Severity: 0x53, // 'S' (localized)
  SeverityNonLocalized: 0x56, // 'V'
  Code: 0x43, // 'C'
  Message: 0x4d, // 'M'
  Detail: 0x44, // 'D'
  Hint: 0x48, // 'H'
} as const;
