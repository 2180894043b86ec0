// What a QEMU stream may carry that the decoder cannot follow, QEMU 7.2 to 10.x,
// each named with the setting on the sending QEMU that avoids it, so a refusal
// tells the operator what to change rather than only what was found.
// Sources: migration/ram.h (RAM_SAVE_FLAG_*), migration/savevm.c (MIG_CMD_*,
// the configuration section's subsections), migration/options.c.

// RAM record flags. 0x100 (compress) was removed in QEMU 9.1. 0x200 alone
// (MULTIFD_FLUSH) is handled by the decoder; combined with others it is refused.
export const MULTIFD = 'capability multifd is on and pages travel on channels bgsnap does not read; turn multifd off';

export const UNSUPPORTED_FLAGS: [number, string][] = [
  [0x40, 'XBZRLE: capability xbzrle is on; turn it off (migrate-set-capabilities xbzrle=false)'],
  [0x100, 'COMPRESS_PAGE: capability compress is on (QEMU before 9.1); turn it off'],
  [0x200, `MULTIFD_FLUSH: ${MULTIFD}`],
  [0x80, 'HOOK: the stream comes from an rdma: migration; use exec: or a socket'],
  [0x01, 'FULL: obsolete since 2009'],
];

// MIG_CMD_* numbers of COMMAND (0x08) sections, savevm.c.
export const CMD = {
  OPEN_RETURN_PATH: 1, PING: 2, POSTCOPY_ADVISE: 3, POSTCOPY_LISTEN: 4, POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6, PACKAGED: 7, ENABLE_COLO: 8, POSTCOPY_RESUME: 9, RECV_BITMAP: 10,
  SWITCHOVER_START: 11,
} as const;

const POSTCOPY = 'capability postcopy-ram is on; turn it off (migrate-set-capabilities postcopy-ram=false)';
const COMMAND_FIX: Record<number, string> = {
  [CMD.OPEN_RETURN_PATH]: 'capability return-path (or postcopy-ram) is on; turn it off',
  [CMD.PING]: POSTCOPY,
  [CMD.POSTCOPY_ADVISE]: POSTCOPY,
  [CMD.POSTCOPY_LISTEN]: POSTCOPY,
  [CMD.POSTCOPY_RUN]: POSTCOPY,
  [CMD.POSTCOPY_RAM_DISCARD]: POSTCOPY,
  [CMD.PACKAGED]: POSTCOPY,
  [CMD.ENABLE_COLO]: 'capability x-colo is on; turn it off',
  [CMD.POSTCOPY_RESUME]: `postcopy recovery; ${POSTCOPY}`,
  [CMD.RECV_BITMAP]: `postcopy recovery; ${POSTCOPY}`,
};

export function commandRefusal(cmd: number): string {
  const name = Object.entries(CMD).find(([, v]) => v === cmd)?.[0];
  if (!name) return `unknown COMMAND section ${cmd} (a QEMU newer than 10.x?)`;
  return `COMMAND section ${name} is not supported: ${COMMAND_FIX[cmd]}`;
}

// configuration/capabilities lists the capabilities the destination must also
// have on (x-ignore-shared, mapped-ram); each changes the RAM section's layout.
export function capabilityRefusal(caps: string[]): string {
  const list = caps.map((c) => `'${c}'`).join(', ');
  return `stream made with migration capabilities ${list}, which change the RAM layout; turn them off ` +
    `(migrate-set-capabilities ${caps.map((c) => `${c}=false`).join(' ')})`;
}
