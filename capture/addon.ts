// Loads the native addon built from capture/native by the set-up command
// (node-gyp). Compiled to dist/capture/addon.js, so the build dir is two up.
import * as path from 'node:path';

export interface Addon {
  punchHole(fd: number, offset: number, length: number): void;
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  [name: string]: unknown;
}

const addonPath = path.join(__dirname, '..', '..', 'build', 'Release', 'bgsnap.node');

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const addon: Addon = require(addonPath) as Addon;
