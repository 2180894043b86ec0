// One way to talk QMP to a VM, two ways to get there: straight to QEMU's QMP
// socket (`--qmp`, capture/qmp.ts), or through libvirt, which holds the QMP
// monitor of the VMs it manages (`--domain`, capture/libvirt-qmp.ts). The
// capture logic (qemu-source, qemu-events, qemu-disks and their guards) only
// sees this interface, so both paths share every line of it.
import { LibvirtQmp } from './libvirt-qmp';
import { QmpClient, type QmpEvent } from './qmp';

// Where a VM's QMP is. Serializable: the guard processes reconnect with it.
export type QmpTarget = { qmp: string } | { domain: string; connect?: string };

// How QEMU reaches a Unix socket we listen on. `address` is a QAPI
// SocketAddress: by path when QEMU can see our file system, or a socket we
// connected and handed to QEMU's monitor by name (getfd), when QEMU runs under
// another user or a security label (libvirt). release() takes back a handed-over
// fd that QEMU never used, so none is left in its monitor.
export interface SocketHandOver {
  address: { type: 'unix'; path: string } | { type: 'fd'; str: string };
  release(): Promise<void>;
}

export interface QmpTransport {
  readonly target: QmpTarget;
  readonly path: string; // for messages: the socket, or "libvirt domain NAME"
  readonly qemuVersion: string;
  readonly events: QmpEvent[]; // every event received since connecting, oldest first
  readonly closed: boolean;
  // The QMP socket's fd when we speak to QEMU directly (SO_PEERCRED: QEMU's
  // pid); absent through libvirt.
  readonly fd?: number | null;
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: { timeoutMs?: number }): Promise<T>;
  waitForEvent(name: string, timeoutMs: number, pred?: (ev: QmpEvent) => boolean, sinceIndex?: number): Promise<QmpEvent>;
  reachSocket(sockPath: string, name: string): Promise<SocketHandOver>;
  // Names for drives that query-block shows only by device alias (libvirt's
  // targets, "vda"); absent: the alias is the name.
  driveNames?(): Promise<Map<string, string>>;
  close(): void;
}

export function describeTarget(t: QmpTarget): string {
  return 'qmp' in t ? t.qmp : `libvirt domain "${t.domain}"${t.connect ? ` on ${t.connect}` : ''}`;
}

// The migration URI for a handed-over socket.
export function migrationUri(a: SocketHandOver['address']): string {
  return a.type === 'unix' ? `unix:${a.path}` : `fd:${a.str}`;
}

export async function connectTransport(t: QmpTarget, opts: { timeoutMs?: number; events?: boolean } = {}): Promise<QmpTransport> {
  if ('qmp' in t) return QmpClient.connect(t.qmp, opts);
  return LibvirtQmp.connect(t.domain, t.connect, opts);
}
