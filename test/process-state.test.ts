// The process.state codec: version 2 carries each thread's XSAVE area
// (NT_X86_XSTATE); images written before it (version 1, no xstate) still read
// and still convert, without that note.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { decodeProcessState, encodeProcessState, type ProcessState } from '../format/process-state';
import { buildNotes } from '../receiver/convert-elf';

const NT_X86_XSTATE = 0x202;

function sample(xstate: Buffer): ProcessState {
  return {
    pid: 42, exe: '/bin/x', argv: ['/bin/x'], arch: 'x86_64', pageSize: 4096, snapshotTime: 1, maps: [],
    threads: [{ tid: 42, regs: Buffer.alloc(216, 1), fpregs: Buffer.alloc(512, 2), xstate, pendingSignal: 0 }],
    auxv: Buffer.alloc(16), status: 'Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t100\t0\t0\t0\n', freeze: {},
  };
}

// The notes' types, in order (namesz, descsz, type, name and desc padded to 4).
function noteTypes(notes: Buffer): number[] {
  const out: number[] = [];
  const al = (n: number) => (n + 3) & ~3;
  for (let o = 0; o < notes.length; o += 12 + al(notes.readUInt32LE(o)) + al(notes.readUInt32LE(o + 4))) out.push(notes.readUInt32LE(o + 8));
  return out;
}

test('version 2 round trip keeps the xstate', () => {
  const xs = Buffer.from(Array.from({ length: 2688 }, (_, i) => i & 0xff));
  const blob = encodeProcessState(sample(xs));
  assert.is(blob.readUInt32LE(8), 2);
  const s = decodeProcessState(blob);
  assert.ok(s.threads[0].xstate.equals(xs));
  assert.ok(noteTypes(buildNotes(s)).includes(NT_X86_XSTATE));
});

// What version 1 wrote: the same layout, threads without xstate.
function versionOne(): Buffer {
  const blob = encodeProcessState(sample(Buffer.alloc(0)));
  const len = blob.readUInt32LE(12);
  const json = JSON.parse(blob.subarray(16, 16 + len).toString('utf8')) as { threads: Record<string, unknown>[] };
  for (const t of json.threads) delete t.xstate;
  const text = Buffer.from(JSON.stringify(json), 'utf8');
  const head = Buffer.alloc(16);
  blob.copy(head, 0, 0, 8);
  head.writeUInt32LE(1, 8);
  head.writeUInt32LE(text.length, 12);
  const pad = Buffer.alloc((8 - ((16 + text.length) % 8)) % 8);
  const binary = blob.subarray(16 + len + ((8 - ((16 + len) % 8)) % 8));
  return Buffer.concat([head, text, pad, binary]);
}

test('a version 1 blob (no xstate) still decodes and converts, without NT_X86_XSTATE', () => {
  const s = decodeProcessState(versionOne());
  assert.is(s.threads[0].xstate.length, 0);
  assert.ok(s.threads[0].regs.equals(Buffer.alloc(216, 1)));
  assert.ok(s.threads[0].fpregs.equals(Buffer.alloc(512, 2)));
  assert.not.ok(noteTypes(buildNotes(s)).includes(NT_X86_XSTATE));
});

test('an unknown version is refused by name', () => {
  const blob = encodeProcessState(sample(Buffer.alloc(0)));
  blob.writeUInt32LE(3, 8);
  assert.throws(() => decodeProcessState(blob), /unsupported version 3/);
});

test.run();
