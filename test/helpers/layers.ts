// The layer rules, checked on the TypeScript sources: which top-level directory
// may import which. format/ is pure codecs (no I/O modules); io/ (bytes, sinks,
// file operations) and net/ (auth, transport) are shared; capture/ and receiver/
// meet only through them and never import each other.
import * as fs from 'node:fs';
import * as path from 'node:path';

export const MAY_IMPORT: Record<string, string[]> = {
  format: ['format'],
  io: ['format', 'io'],
  net: ['format', 'io', 'net'],
  capture: ['format', 'io', 'net', 'capture'],
  receiver: ['format', 'io', 'net', 'receiver'],
};

// Packages a pure codec may use: hashing and compression, nothing that does I/O.
export const FORMAT_PACKAGES = ['node:crypto', 'node:zlib', 'zstd-napi', 'zstd-napi/binding'];

export interface Source {
  file: string; // relative to the repo root, e.g. 'receiver/image.ts'
  text: string;
}

// Every module specifier of a file: import/export ... from, bare import, import(), require().
export function specifiers(text: string): string[] {
  const re = /\b(?:from\s*|import\s*\(?\s*|require\s*\(\s*)['"]([^'"]+)['"]/g;
  return [...text.matchAll(re)].map((m) => m[1]);
}

export function violations(sources: Source[]): string[] {
  const out: string[] = [];
  for (const { file, text } of sources) {
    const layer = file.split('/')[0];
    const allowed = MAY_IMPORT[layer];
    if (!allowed) continue;
    for (const spec of specifiers(text)) {
      if (spec.startsWith('.')) {
        const target = path.posix.normalize(path.posix.join(path.posix.dirname(file), spec)).split('/')[0];
        if (!allowed.includes(target)) out.push(`${file} imports ${spec} (${layer}/ may import only ${allowed.join(', ')})`);
      } else if (layer === 'format' && !FORMAT_PACKAGES.includes(spec)) {
        out.push(`${file} imports ${spec} (format/ is pure codecs: only ${FORMAT_PACKAGES.join(', ')})`);
      }
    }
  }
  return out;
}

export function readSources(root: string): Source[] {
  const out: Source[] = [];
  const walk = (dir: string) => {
    for (const e of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
      const rel = path.posix.join(dir, e.name);
      if (e.isDirectory()) walk(rel);
      else if (e.name.endsWith('.ts')) out.push({ file: rel, text: fs.readFileSync(path.join(root, rel), 'utf8') });
    }
  };
  for (const layer of Object.keys(MAY_IMPORT)) if (fs.existsSync(path.join(root, layer))) walk(layer);
  return out;
}
