// Real servers from Debian's packages, each private to a temp dir (unix socket
// there, no TCP port, no persistence of its own), daemonized so they are not our
// children. Used by the real-program tests and bench/redis-clients.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

export function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

async function until(what: string, ok: () => boolean, ms = 20_000): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 50))) {
    if (ok()) return;
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}`);
}

export interface Redis {
  pid: number;
  sock: string;
  cli(...args: string[]): string; // redis-cli's reply
  stop(): void;
}

export async function startRedis(dir: string): Promise<Redis> {
  const sock = path.join(dir, 'redis.sock'), pidfile = path.join(dir, 'redis.pid');
  execFileSync('redis-server', ['--port', '0', '--unixsocket', sock, '--daemonize', 'yes', '--pidfile', pidfile,
    '--dir', dir, '--save', '', '--appendonly', 'no', '--logfile', path.join(dir, 'redis.log')]);
  await until('redis-server to write its pid file and socket', () => fs.existsSync(pidfile) && fs.existsSync(sock));
  const pid = Number(fs.readFileSync(pidfile, 'utf8').trim());
  const cli = (...args: string[]) => execFileSync('redis-cli', ['-s', sock, ...args], { encoding: 'utf8' }).trim();
  await until('redis PING', () => { try { return cli('PING') === 'PONG'; } catch { return false; } });
  return { pid, sock, cli, stop: () => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } } };
}

export interface Postgres {
  pid: number; // the postmaster
  dir: string; // socket directory
  port: number;
  psql(sql: string, db?: string): string; // tuples only, unaligned
  stop(): void;
}

// initdb and the server run as `postgres` (the server refuses root). The data
// dir and socket dir live in a dir that user owns.
export async function startPostgres(dir: string, port: number): Promise<Postgres> {
  const bin = pgBin();
  const data = path.join(dir, 'data');
  fs.chmodSync(dir, 0o755);
  execFileSync('chown', ['postgres:postgres', dir]);
  const as = (cmd: string, args: string[]) => execFileSync('runuser', ['-u', 'postgres', '--', path.join(bin, cmd), ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  as('initdb', ['-D', data, '-A', 'trust', '-U', 'postgres', '--no-sync']);
  const opts = `-k ${dir} -p ${port} -c listen_addresses='' -c fsync=off -c shared_buffers=64MB`;
  as('pg_ctl', ['-D', data, '-o', opts, '-l', path.join(dir, 'pg.log'), '-w', 'start']);
  const pid = Number(fs.readFileSync(path.join(data, 'postmaster.pid'), 'utf8').split('\n')[0]);
  const psql = (sql: string, db = 'postgres') => execFileSync('psql', ['-h', dir, '-p', String(port), '-U', 'postgres', '-d', db, '-tAc', sql], { encoding: 'utf8' }).trim();
  return {
    pid, dir, port, psql,
    stop: () => { spawnSync('runuser', ['-u', 'postgres', '--', path.join(bin, 'pg_ctl'), '-D', data, '-m', 'immediate', 'stop'], { stdio: 'ignore' }); },
  };
}

// Debian keeps initdb and pg_ctl out of PATH, under /usr/lib/postgresql/VERSION/bin.
export function pgBin(): string {
  const root = '/usr/lib/postgresql';
  const versions = fs.existsSync(root) ? fs.readdirSync(root).filter((v) => fs.existsSync(path.join(root, v, 'bin', 'initdb'))) : [];
  if (!versions.length) throw new Error(`no PostgreSQL server under ${root}`);
  return path.join(root, versions.sort((a, b) => Number(b) - Number(a))[0], 'bin');
}
