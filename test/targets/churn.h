// Churn for the "churn" mode: a thread that keeps freeing, unmapping and moving
// scratch mappings (madvise DONTNEED, munmap + mmap, mremap to another place)
// while a capture runs. Every scratch page is {magic, slot, page, version} plus
// stamps of the version, so a page saved from the wrong address or torn shows.
// The page being filled at any instant is named in a journal in page 0 at 2048
// (a frozen instant may catch a fill half done).
#define SLOTS 16
#define SLOT_PAGES 256
#define SCRATCH_MAGIC 0x6863726174637362ull  // "bscratch"

struct churn_journal {
  volatile uint64_t active, addr, ops;
};

static uint8_t *slot_at[SLOTS], *slot_alt[SLOTS];
static uint64_t slot_version[SLOTS];

static struct churn_journal *CJ(void) { return (struct churn_journal *)(region + 2048); }

static void fill_page(int s, int p, uint64_t v) {
  uint64_t *w = (uint64_t *)(slot_at[s] + (size_t)p * PAGE);
  CJ()->addr = (uint64_t)(uintptr_t)w; barrier(); CJ()->active = 1; barrier();
  w[0] = SCRATCH_MAGIC; w[1] = s; w[2] = p; w[3] = v;
  for (int k = 1; k <= STAMPS; k++) w[8 * k] = v;
  barrier(); CJ()->active = 0; barrier();
}

static void fill_slot(int s, int from, int to) {
  uint64_t v = ++slot_version[s];
  for (int p = from; p < to; p++) fill_page(s, p, v);
}

static uint8_t *map_scratch(void *at) {
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED : 0);
  uint8_t *p = mmap(at, (size_t)SLOT_PAGES * PAGE, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED) die("mmap scratch");
  return p;
}

// Keep the other position of a slot reserved, so mremap can move onto it.
static void reserve(uint8_t *at) {
  if (mmap(at, (size_t)SLOT_PAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
           0) == MAP_FAILED)
    die("reserve");
}

static void churn_step(uint64_t *seed) {
  int s = (int)(rnd(seed) % SLOTS), action = (int)(rnd(seed) % 3);
  size_t len = (size_t)SLOT_PAGES * PAGE;
  if (action == 0) {
    if (madvise(slot_at[s] + len / 2, len / 2, MADV_DONTNEED) != 0) die("madvise");
    fill_slot(s, SLOT_PAGES / 2, SLOT_PAGES);
  } else if (action == 1) {
    if (munmap(slot_at[s], len) != 0) die("munmap");
    map_scratch(slot_at[s]);
    fill_slot(s, 0, SLOT_PAGES);
  } else {
    uint8_t *to = slot_alt[s];
    if (mremap(slot_at[s], len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to) != to) die("mremap");
    slot_alt[s] = slot_at[s];
    slot_at[s] = to;
    reserve(slot_alt[s]);
  }
  CJ()->ops++;
}

static void *churn(void *arg) {
  (void)arg;
  uint64_t seed = 4242;
  // One operation per 20 ms: each slot is hit about every 0.3 s, so a paced
  // capture sees slots both saved intact and destroyed before it got there.
  struct timespec ts = {0, 20000000};
  for (;;) {
    churn_step(&seed);
    if (nanosleep(&ts, NULL) != 0) die("nanosleep (churn)");
  }
  return NULL;
}

static void start_churn(void) {
  for (int s = 0; s < SLOTS; s++) {
    // Separate the slots with guard pages so no two scratch mappings merge.
    uint8_t *area = mmap(NULL, (size_t)(2 * SLOT_PAGES + 3) * PAGE, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) die("mmap area");
    slot_at[s] = map_scratch(area + PAGE);
    slot_alt[s] = area + (size_t)(SLOT_PAGES + 2) * PAGE;
    fill_slot(s, 0, SLOT_PAGES);
  }
  pthread_t th;
  pthread_create(&th, NULL, churn, NULL);
}
