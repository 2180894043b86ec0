{
  "target_defaults": {
    "include_dirs": ["io/native", "<!(node -p \"require('node-addon-api').include_dir\")"],
    "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_CPP_EXCEPTIONS"],
    "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-fno-exceptions"],
    "cflags_cc!": ["-fno-rtti"]
  },
  "targets": [
    {
      "target_name": "bgsnap",
      "sources": [
        "capture/native/addon.cc", "io/native/errno_error.cc", "capture/native/preflight.cc",
        "capture/native/freezer_client.cc", "capture/native/clock.cc", "capture/native/procfs.cc",
        "capture/native/buffers.cc", "capture/native/uffd_capture.cc", "capture/native/protect.cc", "capture/native/session.cc",
        "capture/native/saver.cc", "capture/native/page_read.cc", "capture/native/release.cc", "capture/native/fault_server.cc", "capture/native/frozen_copy.cc", "capture/native/capture_js.cc", "capture/native/capture_info.cc",
        "capture/native/qemu_uffd.cc", "capture/native/generations.cc", "capture/native/precopy.cc", "capture/native/side_read.cc", "io/native/crc32.cc"
      ],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "bgsnap_fileops",
      "sources": ["io/native/fileops.cc", "io/native/pagewrite.cc", "io/native/crc32.cc", "io/native/errno_error.cc", "io/native/mapped_input.cc", "io/native/feed.cc", "io/native/write_behind.cc"]
    },
    {
      "target_name": "bgsnap-freezer",
      "type": "executable",
      "sources": [
        "capture/native/freezer_main.cc", "capture/native/clock.cc", "capture/native/ptrace_freeze.cc", "capture/native/inject.cc"
      ]
    }
  ]
}
