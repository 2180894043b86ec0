// Creating the files and directories that hold a snapshot's memory (streams,
// images, cores, raw memory, vmstate): they hold the target's secrets, so they
// are private to their owner (0600 files, 0700 directories) whatever the umask,
// as the kernel writes its cores. The final path component is never followed
// if it is a symbolic link (another user could point it at a file of ours), and
// an existing entry is replaced only when the caller says so (--force), by a new
// one: never written through, so no old inode, hard link or mode carries over.
import * as fs from 'node:fs';
import * as path from 'node:path';

export const FILE_MODE = 0o600;
export const DIR_MODE = 0o700;

export interface CreateOptions {
  force?: boolean; // replace an existing file or directory (never a symbolic link)
  read?: boolean; // files: open for reading too
}

function fail(what: string, code: string): never {
  throw Object.assign(new Error(what), { code });
}

// Refuses a symbolic link; says whether something else exists there.
function existing(p: string): fs.Stats | undefined {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  if (st.isSymbolicLink()) fail(`${p} is a symbolic link; refusing to write through it`, 'ELOOP');
  return st;
}

function explain(p: string, e: NodeJS.ErrnoException, kind: string): never {
  if (e.code === 'EEXIST') fail(`${p} already exists (use --force to replace it)`, 'EEXIST');
  if (e.code === 'ELOOP') fail(`${p} is a symbolic link; refusing to write through it`, 'ELOOP');
  throw Object.assign(new Error(`creating ${kind} ${p}: ${e.message}`), { code: e.code });
}

// Opens a new file for writing, mode 0600: O_EXCL (so never an existing file nor
// a symbolic link, even a dangling one) and O_NOFOLLOW. With force, an existing
// regular file is unlinked first. An existing FIFO or character device (a pipe,
// /dev/null) is written as it is: it stores nothing.
export function openPrivateFile(file: string, opts: CreateOptions = {}): number {
  const st = existing(file);
  if (st && (st.isFIFO() || st.isCharacterDevice()) && !opts.read) {
    return fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_NOFOLLOW);
  }
  if (st && opts.force) {
    if (!st.isFile()) fail(`${file} exists and is not a regular file; not replacing it`, 'EEXIST');
    fs.unlinkSync(file);
  }
  const { O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
  let fd: number;
  try {
    fd = fs.openSync(file, (opts.read ? O_RDWR : O_WRONLY) | O_CREAT | O_EXCL | O_NOFOLLOW, FILE_MODE);
  } catch (e) {
    explain(file, e as NodeJS.ErrnoException, 'file');
  }
  fs.fchmodSync(fd, FILE_MODE); // a umask can only take bits away; this makes it exact
  return fd;
}

export function writePrivateFile(file: string, data: string | Buffer, opts: CreateOptions = {}): void {
  const fd = openPrivateFile(file, opts);
  try {
    fs.writeFileSync(fd, data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// Creates a new directory, mode 0700 (its parents as usual). With force an
// existing directory is removed first with everything in it.
export function makePrivateDir(dir: string, opts: CreateOptions = {}): void {
  const st = existing(dir);
  if (st && opts.force) {
    if (!st.isDirectory()) fail(`${dir} exists and is not a directory; not replacing it`, 'EEXIST');
    fs.rmSync(dir, { recursive: true, force: true });
  }
  fs.mkdirSync(path.dirname(path.resolve(dir)), { recursive: true });
  try {
    fs.mkdirSync(dir, { mode: DIR_MODE }); // fails on any existing entry, a symbolic link included
  } catch (e) {
    explain(dir, e as NodeJS.ErrnoException, 'directory');
  }
  const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY | fs.constants.O_NOFOLLOW);
  try {
    fs.fchmodSync(fd, DIR_MODE);
  } finally {
    fs.closeSync(fd);
  }
}
