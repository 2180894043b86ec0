// One error type for everything wrong with a stream. `code` is stable for
// programs; the message names the format, what was wrong and where (byte offset
// into the stream, and the frame or section when known), for people.

export type StreamErrorCode =
  | 'BAD_MAGIC'
  | 'BAD_VERSION'
  | 'UNKNOWN_FRAME'
  | 'BAD_CHECKSUM'
  | 'TOO_LARGE'
  | 'MALFORMED'
  | 'OUT_OF_BOUNDS'
  | 'BLOCK_MISMATCH'
  | 'UNSUPPORTED'
  | 'TRUNCATED'
  | 'TOTALS_MISMATCH';

export class StreamError extends Error {
  readonly code: StreamErrorCode;
  readonly offset: number;
  constructor(format: string, code: StreamErrorCode, offset: number, detail: string) {
    super(`${format} stream: ${detail} (at byte ${offset})`);
    this.name = 'StreamError';
    this.code = code;
    this.offset = offset;
  }
}
