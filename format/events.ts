// The decoded form of any snapshot stream. Both wire codecs (bgsnap.ts, qemu.ts)
// decode into these events and the receiver consumes only these, so a sink never
// knows which wire format a capture used.
//
// Pages travel in batches: one object per batch, never one per page, because a
// 2 GiB snapshot is half a million pages and per-page objects dominate the cost.

export type SourceKind = 'qemu' | 'process';

export interface StreamHeader {
  snapshotId: string; // 32 lowercase hex digits
  source: SourceKind;
  pageSize: number; // bytes, a power of two
  created: number; // ms since the epoch, at the snapshot point
  label: string; // free text: the VM's machine type, the process command, ...
  chain?: boolean; // a chain of generations (stream version 2, SPEC.md, "Chains of generations")
}

export interface BlockInfo {
  name: string; // QEMU RAMBlock id, or a mapping's description for processes
  length: number; // bytes, a multiple of pageSize
  address: number; // guest-physical or virtual start address; 0 when unknown
}

// A batch of pages of one block, in any order. index[i] is the page number inside
// the block; zero[i] is 1 when the page is all zeroes (it then has no bytes in
// data). data holds the non-zero pages back to back, in the order of index.
export interface PageBatch {
  block: number;
  index: Uint32Array;
  zero: Uint8Array;
  data: Buffer;
  crcs?: Uint32Array; // CRC-32 of each data page, in data order, when the decoder (or the capture engine) already computed them
  check?: PageCheck; // set when the decoder left the frame's checksum to the sink (see PageCheck)
}

// A frame checksum the decoder did not verify because the sink checksums every
// page anyway (BgsnapDecoder's deferPageChecks): the frame is intact when the
// CRC of the frame up to its first data page (seed), extended by each data page
// in data order, equals expected. A sink given a check must verify it before it
// stores any page of the batch, and fail with the error below if it does not.
export interface PageCheck {
  seed: number;
  expected: number;
  frame: number; // frame number, for the error
  offset: number; // stream offset of the frame, for the error
}

// Pages whose snapshot content was destroyed by the target before it was saved
// (process capture: MADV_DONTNEED, munmap). They are not part of the snapshot.
export interface DiscardBatch {
  block: number;
  index: Uint32Array;
}

export interface StateBlob {
  kind: string; // e.g. 'qemu.preamble', 'qemu.devices', 'process.state'
  data: Buffer;
}

// Totals the sender claims; the receiver proves completeness by matching them.
export interface StreamTotals {
  pages: number; // page records sent, duplicates included
  zeroPages: number; // of which zero records
  discarded: number; // pages reported discarded
  batches: number;
  states: number;
  generations?: number; // chain streams only: generations sent
}

// Chains (SPEC.md, "Chains of generations"): a generation's start. Blocks are numbered across
// the whole chain; `removed` lists blocks live until the previous generation
// that this one no longer has (unmapped, or replaced by a remapped block).
export interface GenerationStart {
  generation: number; // 1, 2, ... consecutive
  instant: number; // ms since the epoch: wall-clock time of this generation's freeze
  removed: number[];
  // Not in the stream: the producer races the target's writes here (a
  // pre-copy's later passes and its snapshot), so an encoder leaves these
  // pages uncompressed rather than slow it down.
  racing?: boolean;
}

// What one generation carried, as the sender counted it: its GENERATION_END
// record, which proves the generation arrived whole. `pass` is a declaration,
// not a count: the generation is a pre-copy pass (SPEC.md, "Pre-copy passes"),
// pages read while the target ran, the base for later generations and not a
// snapshot of its own. Absent when not a pass.
export interface GenerationTotals {
  generation: number;
  blocksAdded: number;
  blocksRemoved: number;
  pages: number;
  zeroPages: number;
  discarded: number;
  batches: number;
  states: number;
  pass?: boolean;
}

export type StreamEvent =
  | { type: 'header'; header: StreamHeader }
  | { type: 'blocks'; blocks: BlockInfo[] }
  | { type: 'pages'; batch: PageBatch }
  | { type: 'discard'; batch: DiscardBatch }
  | { type: 'state'; state: StateBlob }
  | { type: 'generation'; generation: GenerationStart }
  | { type: 'generation-end'; totals: GenerationTotals }
  | { type: 'end'; totals: StreamTotals };

// Every decoder has this shape: feed bytes as they arrive, collect events; finish()
// at end of input throws if the stream did not provably end.
export interface StreamDecoder {
  push(chunk: Buffer): StreamEvent[];
  finish(): StreamEvent[];
  readonly bytesIn: number;
}
