// The network receiver's front door, over real sockets on 127.0.0.1 with the
// real CLIs: mutual TLS with a throwaway PKI, a shared token (plain TCP with
// --insecure, and inside TLS), and every refusal leaving nothing under ROOT.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, run } from './helpers/cli';
import { generate } from './helpers/streams';
import { dirEntries, makePki, relay, startReceiver, tmpDir, writeToken, type Pki } from './helpers/net';

const work = tmpDir('net-auth');
const pki: Pki = makePki(work);
const stream = generate(41).stream;

async function verified(image: string): Promise<void> {
  const v = await run(BIN.inspect, ['--verify', image]);
  assert.is(v.code, 0, v.stdout + v.stderr);
  assert.match(v.stdout, /verify {4}OK/);
}

test('mutual TLS: a client with a certificate from the CA is stored and verifies', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, ['--cert', pki.serverCert, '--key', pki.serverKey, '--ca', pki.ca]);
  try {
    const r = await relay(stream, rx.url, ['--ca', pki.ca, '--cert', pki.clientCert, '--key', pki.clientKey, '--name', 'tls1']);
    assert.is(r.code, 0, r.stderr);
    assert.equal(dirEntries(root), ['tls1']);
    await verified(path.join(root, 'tls1'));
  } finally {
    await rx.kill();
  }
});

test('mutual TLS: no client certificate, a rogue one, or a rogue server: refused, nothing written', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, ['--cert', pki.serverCert, '--key', pki.serverKey, '--ca', pki.ca]);
  try {
    const noCert = await relay(stream, rx.url, ['--ca', pki.ca, '--name', 'nocert']);
    assert.is.not(noCert.code, 0);
    assert.match(noCert.stderr, /certificate|handshake|closed/i);
    const rogue = await relay(stream, rx.url, ['--ca', pki.ca, '--cert', pki.rogueClientCert, '--key', pki.rogueClientKey, '--name', 'rogue']);
    assert.is.not(rogue.code, 0);
    assert.match(rogue.stderr, /certificate|alert|closed/i);
    const wrongCa = await relay(stream, rx.url, ['--ca', pki.rogueCa, '--cert', pki.clientCert, '--key', pki.clientKey, '--name', 'wrongca']);
    assert.is.not(wrongCa.code, 0);
    assert.match(wrongCa.stderr, /certificate/i);
    assert.equal(dirEntries(root), [], 'nothing under ROOT');
    assert.match(rx.stderr(), /TLS handshake refused/);
  } finally {
    await rx.kill();
  }
});

test('token over plain TCP (--insecure): right token stored, wrong or missing token refused with nothing written', async () => {
  const root = tmpDir('root');
  const token = writeToken(work, 'token-a');
  const other = writeToken(work, 'token-b');
  const rx = await startReceiver(root, ['--insecure', '--token-file', token]);
  try {
    const wrong = await relay(stream, rx.url, ['--insecure', '--token-file', other, '--name', 'wrong']);
    assert.is.not(wrong.code, 0);
    assert.match(wrong.stderr, /refused the capture \(AUTH\): authentication failed/);
    const none = await run(BIN.receive, ['--to', rx.url, '--insecure', '--name', 'none'], 30_000, stream);
    assert.is.not(none.code, 0);
    assert.match(none.stderr, /requires a token/);
    assert.equal(dirEntries(root), [], 'nothing under ROOT after refusals');
    const ok = await relay(stream, rx.url, ['--insecure', '--token-file', token]);
    assert.is(ok.code, 0, ok.stderr);
    assert.equal(dirEntries(root), ['ab'.repeat(16)], 'named by the snapshot id');
    await verified(path.join(root, 'ab'.repeat(16)));
    const again = await relay(stream, rx.url, ['--insecure', '--token-file', token]);
    assert.is.not(again.code, 0, 'a complete image is never overwritten');
    assert.match(again.stderr, /already exists and is complete/);
    await verified(path.join(root, 'ab'.repeat(16)));
  } finally {
    await rx.kill();
  }
});

test('token inside TLS (server certificate only), and bad names refused before any write', async () => {
  const root = tmpDir('root');
  const token = writeToken(work, 'token-c');
  const rx = await startReceiver(root, ['--cert', pki.serverCert, '--key', pki.serverKey, '--token-file', token]);
  try {
    const ok = await relay(stream, rx.url, ['--ca', pki.ca, '--token-file', token, '--name', 'tls-token']);
    assert.is(ok.code, 0, ok.stderr);
    for (const bad of ['../escape', '.hidden', 'a/b', 'x'.repeat(200)]) {
      const r = await relay(stream, rx.url, ['--ca', pki.ca, '--token-file', token, '--name', bad]);
      assert.is.not(r.code, 0, bad);
      assert.match(r.stderr, /refused the capture \((NAME|PROTOCOL)\)/, bad);
    }
    assert.equal(dirEntries(root), ['tls-token']);
    assert.equal(dirEntries(path.dirname(root)).filter((e) => e === 'escape'), []);
  } finally {
    await rx.kill();
  }
});

test('plain TCP needs --insecure on both ends, and the receiver needs a way to authenticate', async () => {
  const root = tmpDir('root');
  const token = writeToken(work, 'token-d');
  const noTls = await run(BIN.receive, ['--listen', '127.0.0.1:0', '--dir', root, '--token-file', token], 20_000);
  assert.is.not(noTls.code, 0);
  assert.match(noTls.stderr, /refusing plain TCP/);
  const noAuth = await run(BIN.receive, ['--listen', '127.0.0.1:0', '--dir', root, '--cert', pki.serverCert, '--key', pki.serverKey], 20_000);
  assert.is.not(noAuth.code, 0);
  assert.match(noAuth.stderr, /no way to authenticate senders/);
  const client = await relay(stream, 'tcp://127.0.0.1:9', ['--token-file', token]);
  assert.is.not(client.code, 0);
  assert.match(client.stderr, /refusing plain TCP/);
  assert.equal(dirEntries(root), []);
});

test.after(() => fs.rmSync(work, { recursive: true, force: true }));
test.run();
