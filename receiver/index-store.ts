// The image index: a LevelDB database beside the data file. Small JSON records
// describe the image; binary records hold per-chunk page bitmaps and state blobs.
//
//   format            {"version":1,"pageSize":4096,"blockAlign":2097152,"chunkPages":32768}
//   status            {"status":"incomplete"|"complete","reason":"...","updated":ms}
//   header            the stream header (snapshot id, source, label, created)
//   blocks            [{name,length,address,base,pages}]  base = offset in the data file
//   bitmap/B/C        bitmaps of chunk C of block B: present | data | discarded,
//                     each ceil(pages in chunk / 8) bytes, bit p%8 of byte p/8
//   crc/B/C           CRC32 of each data page of chunk C of block B, one u32 LE
//                     per page of the chunk; meaningful where the data bit is set
//                     (absent for a chunk without data pages); see --verify
//   state/KIND        a state blob, verbatim (QEMU device state, process state)
//   totals            the END frame's totals as the sender stated them
//   stats             the receiver's summary (also written by --stats)
import { Level } from 'level';
import { CHUNK_PAGES } from './pagemap';

export const INDEX_VERSION = 1;
export const CHAIN_INDEX_VERSION = 2; // a chain of generations: chain-image.ts

export type ImageStatus = { status: 'incomplete' | 'complete'; reason: string; updated: number };

export class IndexStore {
  private constructor(private readonly db: Level<string, Buffer>) {}

  static async open(dir: string, createIfMissing: boolean): Promise<IndexStore> {
    const db = new Level<string, Buffer>(dir, { keyEncoding: 'utf8', valueEncoding: 'buffer', createIfMissing, errorIfExists: createIfMissing });
    try {
      await db.open();
    } catch (e) {
      const cause = (e as { cause?: Error }).cause?.message ?? (e as Error).message;
      throw new Error(`cannot open image index ${dir}: ${cause}`);
    }
    return new IndexStore(db);
  }

  putJson(key: string, value: unknown, sync = false): Promise<void> {
    return this.db.put(key, Buffer.from(JSON.stringify(value)), { sync }).catch(fsError);
  }

  putBuffer(key: string, value: Buffer): Promise<void> {
    return this.db.put(key, value).catch(fsError);
  }

  async getJson<T>(key: string): Promise<T | undefined> {
    const v = await this.db.get(key);
    return v === undefined ? undefined : (JSON.parse(v.toString('utf8')) as T);
  }

  getBuffer(key: string): Promise<Buffer | undefined> {
    return this.db.get(key);
  }

  // Keys under a prefix, in order (e.g. all state blobs).
  async keysWithPrefix(prefix: string): Promise<string[]> {
    const out: string[] = [];
    for await (const k of this.db.keys({ gte: prefix, lt: prefix + '\xff' })) out.push(k);
    return out;
  }

  // Writes many records at once; sync makes LevelDB fsync its log before returning.
  async putMany(entries: [string, Buffer][], sync: boolean): Promise<void> {
    await this.db.batch(entries.map(([key, value]) => ({ type: 'put' as const, key, value })), { sync }).catch(fsError);
  }

  close(): Promise<void> {
    return this.db.close();
  }
}

// LevelDB says "IO error: FILE: No space left on device" (code LEVEL_IO_ERROR);
// we give a full disk its errno name, as the data file's writes do.
function fsError(e: Error & { code?: string }): never {
  if (/No space left on device/.test(e.message)) throw Object.assign(new Error(`image index: ${e.message}`), { code: 'ENOSPC' });
  throw e;
}

// CRC32 of every data page, kept per chunk and allocated only for chunks that
// receive data, so a huge sparse mapping costs nothing until pages arrive.
// Stored under crc/B/C as CHUNK_PAGES-or-fewer little-endian u32s; a slot counts
// only where the chunk's data bit is set.
export class PageCrcs {
  private readonly chunks = new Map<number, Uint32Array>();
  constructor(readonly pages: number) {}

  private chunkLen(c: number): number {
    return Math.min(CHUNK_PAGES, this.pages - c * CHUNK_PAGES);
  }

  set(page: number, crc: number): void {
    const c = Math.floor(page / CHUNK_PAGES);
    let a = this.chunks.get(c);
    if (!a) this.chunks.set(c, (a = new Uint32Array(this.chunkLen(c))));
    a[page - c * CHUNK_PAGES] = crc;
  }

  encodeChunk(c: number): Buffer | undefined {
    const a = this.chunks.get(c);
    return a && Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  }

  static decodeChunk(buf: Buffer): Uint32Array {
    const a = new Uint32Array(buf.length / 4);
    Buffer.from(a.buffer).set(buf);
    return a;
  }
}
