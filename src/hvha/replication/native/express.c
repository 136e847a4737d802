/* The primary's express path: writes and fsyncs served in C (driven by express.py).
 *
 * Why: a 4 KiB write + fsync makes two FUSE requests and two round trips to the secondary,
 * and in Python each request costs about 50 us of interpreter and thread hand-offs on the
 * primary (docs/benchmarks.md); a 1 MiB write is copied twice more in Python than here. While
 * the stream is in sync and idle on the Python side, the stream lends this code its sequence
 * numbers and its lane (native/lane.c): the FUSE write and fsync handlers then apply
 * locally, number, send and wait for the cumulative ack here, without the interpreter. A
 * large write (>= 128 KiB) is sent straight from FUSE's buffer by a sender thread while its
 * handler writes it here (large_write), so the two overlap; later ops wait until both are
 * done (`local`), so local order and send order are still stream order. Everything else
 * stays in Python, and so does every decision that is not the plain path: a handle or
 * request this code does not serve, a local error, a lost peer. The stream takes the path
 * back (exp_take) before any op of its own, and on any failure; it then reads what is in
 * flight and the activity records (exp_fly, exp_epoch) into its own books, and the waiting
 * handlers ask it (py_wait).
 *
 * Locks: `mu` guards the state; `send_mu` keeps sends in sequence order (taken before `mu`
 * is released, so numbering and sending stay in one order), and is never waited for under
 * `mu`. One thread reads the lane at a time (`reading`); exp_take waits for the reader, the
 * senders and a large write in flight to finish before it returns, so the stream may use
 * and close the lane and apply its own ops locally.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

struct lane;
int lane_send(struct lane *l, const unsigned char *data, size_t n);
int lane_send2(struct lane *l, const unsigned char *head, size_t hn, const unsigned char *data,
	       size_t n);
int lane_next(struct lane *l);
int lane_frame(struct lane *l, uint64_t *seq, unsigned char **payload, uint32_t *len);
const char *lane_error(struct lane *l, int *kind);
void lane_shutdown(struct lane *l);

enum { F_OP = 2, F_ACK = 3, F_NACK = 4, F_ERROR = 7 };
enum { T_WRITE = 2, T_FSYNC = 16 };
enum { LANE_EOF = 0, LANE_ERR = -1, LANE_TIMEOUT = -2 };
enum { K_WRITE = 1, K_FSYNC = 2, K_BARRIER = 3 };
#define HDR 16
#define SMALL (128u << 10)  /* larger writes: sent while written locally (large_write) */
#define LARGE (4u << 20)    /* larger still: Python (the FUSE default max is 1 MiB) */
#define ALIGN 4096u
#define BOUNCE LARGE
#define MAXNAMES 1024
#define MAXFLY 1024
#define CACHE 4096

typedef int (*write_fn)(const char *, const char *, size_t, off_t, void *);
typedef int (*fsync_fn)(const char *, int, void *);
typedef int (*wait_fn)(uint64_t);
typedef void (*void_fn)(void);
typedef int (*alive_fn)(void);
typedef void (*fault_fn)(const char *, int, int);
typedef void **(*context_fn)(void);
typedef int (*diverged_fn)(const char *, uint64_t, uint64_t, uint64_t, int64_t, int);

struct op {
	uint64_t seq, off, len;
	uint32_t kind, name, datasync;
};

struct epoch { /* zones written (name id << 40 | zone), closed by `barrier` (0: open) */
	uint64_t barrier, n, cap;
	uint64_t *keys;
};

struct express {
	pthread_mutex_t mu, send_mu;
	pthread_cond_t cv;
	void *fuse;
	size_t fh_off;
	write_fn py_write;
	fsync_fn py_fsync;
	wait_fn py_wait;
	void_fn py_handover;
	alive_fn py_alive;
	fault_fn py_fault;
	diverged_fn py_diverged;
	int on, taking, reading, sending, broken, fault, root;
	/* large writes: `local` while one is in flight (sent by the sender thread `lw` while its
	 * handler writes it here); later ops wait for it (local and stream order stay one) */
	int local, lw_state, lw_posted, lw_done, lw_rc;
	pthread_t lw;
	pthread_cond_t lw_cv;
	struct lane *lw_lane;
	const unsigned char *lw_head, *lw_data;
	size_t lw_hn, lw_size;
	unsigned char *bounce;
	int *twin; /* per handle: its O_DIRECT twin + 1; 0: not opened yet; -1: none */
	struct lane *lane;
	uint64_t next, acked, last_barrier, bytes_sent, served;
	double timeout, max_age;
	uint64_t max_bytes, zone, epoch_bytes, epoch_no;
	struct timespec progress, epoch_start;
	char reason[512];
	char *names[MAXNAMES];
	uint32_t nnames;
	struct op fly[MAXFLY];
	uint32_t nfly;
	struct epoch *ep;
	uint32_t nep;
	uint64_t cache_key[CACHE], cache_ep[CACHE];
	unsigned char *fhok;
	size_t fhcap;
};

/* ------------------------------------------------------------------ registry (per mount) */

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static struct express *reg[64];

static struct express *find(void **ctx_fuse)
{
	struct express *x = NULL;
	pthread_mutex_lock(&reg_mu);
	for (int i = 0; i < 64 && !x; i++)
		if (reg[i] && reg[i]->fuse == ctx_fuse)
			x = reg[i];
	pthread_mutex_unlock(&reg_mu);
	return x;
}

/* libfuse's fuse_get_context (one libfuse per process: the same for every mount) */
static context_fn context;

/* The calling handler's mount. */
static struct express *me(void)
{
	context_fn c = __atomic_load_n(&context, __ATOMIC_ACQUIRE);
	return c ? find(c()[0]) : NULL;
}

struct express *exp_new(void *fuse, void *ctx, size_t fh_off, void *py_write, void *py_fsync,
			void *py_wait, void *py_handover, void *py_alive, void *py_fault,
			void *py_diverged)
{
	struct express *x = calloc(1, sizeof *x);
	if (!x)
		return NULL;
	pthread_mutex_init(&x->mu, NULL);
	pthread_mutex_init(&x->send_mu, NULL);
	pthread_cond_init(&x->cv, NULL);
	pthread_cond_init(&x->lw_cv, NULL);
	x->fuse = fuse;
	__atomic_store_n(&context, (context_fn)ctx, __ATOMIC_RELEASE);
	x->fh_off = fh_off;
	x->py_write = (write_fn)py_write;
	x->py_fsync = (fsync_fn)py_fsync;
	x->py_wait = (wait_fn)py_wait;
	x->py_handover = (void_fn)py_handover;
	x->py_alive = (alive_fn)py_alive;
	x->py_fault = (fault_fn)py_fault;
	x->py_diverged = (diverged_fn)py_diverged;
	pthread_mutex_lock(&reg_mu);
	int i = 0;
	while (i < 64 && reg[i])
		i++;
	if (i < 64)
		reg[i] = x;
	pthread_mutex_unlock(&reg_mu);
	if (i == 64) {
		free(x);
		return NULL;
	}
	return x;
}

static void forget(struct express *x)
{
	for (uint32_t i = 0; i < x->nnames; i++)
		free(x->names[i]);
	for (uint32_t i = 0; i < x->nep; i++)
		free(x->ep[i].keys);
	free(x->ep);
	x->ep = NULL;
	x->nnames = x->nfly = x->nep = 0;
	x->broken = 0;
	x->reason[0] = 0;
}

/* The mount's libfuse handle, once fuse_new returned it (before it serves requests), and
 * the directory's descriptor opened before the mount (for getxattr). */
void exp_bind(struct express *x, void *fuse, int root)
{
	pthread_mutex_lock(&reg_mu);
	x->fuse = fuse;
	x->root = root;
	pthread_mutex_unlock(&reg_mu);
}

/* Once the mount's loop has ended (no handler runs any more). */
void exp_free(struct express *x)
{
	pthread_mutex_lock(&reg_mu);
	for (int i = 0; i < 64; i++)
		if (reg[i] == x)
			reg[i] = NULL;
	pthread_mutex_unlock(&reg_mu);
	forget(x);
	pthread_mutex_lock(&x->mu);
	int joined = x->lw_state == 1;
	x->lw_state = 2;
	pthread_cond_broadcast(&x->lw_cv);
	pthread_mutex_unlock(&x->mu);
	if (joined)
		pthread_join(x->lw, NULL);
	for (size_t i = 0; i < x->fhcap; i++)
		if (x->twin[i] > 0)
			close(x->twin[i] - 1);
	free(x->twin);
	free(x->bounce);
	free(x->fhok);
	free(x);
}

/* A handle the express path may serve (1) or not (0: O_SYNC, closed). Said when a handle is
 * set up and before it is closed: its O_DIRECT twin, if any, is closed (the number will
 * name another file). */
int exp_fh(struct express *x, uint64_t fh, int ok)
{
	pthread_mutex_lock(&x->mu);
	if (fh >= x->fhcap && ok) {
		size_t cap = fh + 1024;
		unsigned char *p = realloc(x->fhok, cap);
		int *t = realloc(x->twin, cap * sizeof *t);
		if (p)
			x->fhok = p;
		if (t)
			x->twin = t;
		if (!p || !t) {
			pthread_mutex_unlock(&x->mu);
			return 0;
		}
		memset(p + x->fhcap, 0, cap - x->fhcap);
		memset(t + x->fhcap, 0, (cap - x->fhcap) * sizeof *t);
		x->fhcap = cap;
	}
	int twin = 0;
	if (fh < x->fhcap) {
		x->fhok[fh] = (unsigned char)ok;
		twin = x->twin[fh];
		x->twin[fh] = 0;
	}
	pthread_mutex_unlock(&x->mu);
	if (twin > 0)
		close(twin - 1);
	return 1;
}

/* Fsyncs go to Python from now on (its fault latch says every later fsync fails). */
void exp_fault(struct express *x)
{
	pthread_mutex_lock(&x->mu);
	x->fault = 1;
	pthread_mutex_unlock(&x->mu);
}

/* --------------------------------------------------------------------- lending, taking */

static double since(const struct timespec *t)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - t->tv_sec) + (double)(now.tv_nsec - t->tv_nsec) / 1e9;
}

/* The stream lends its lane and numbering: the next op is `next`, ops <= `acked` are
 * acknowledged. epoch_age >= 0: the stream's activity log has an open epoch that old. */
int exp_on(struct express *x, struct lane *lane, uint64_t next, uint64_t acked, double timeout,
	   double max_age, uint64_t max_bytes, uint64_t zone, double epoch_age)
{
	pthread_mutex_lock(&x->mu);
	if (x->on || zone == 0) {
		pthread_mutex_unlock(&x->mu);
		return 0;
	}
	forget(x);
	if (!(x->ep = calloc(1, sizeof *x->ep))) {
		pthread_mutex_unlock(&x->mu);
		return 0;
	}
	x->nep = 1;
	x->epoch_no++;
	x->lane = lane;
	x->next = next;
	x->acked = acked;
	x->last_barrier = x->bytes_sent = 0;
	x->timeout = timeout;
	x->max_age = max_age;
	x->max_bytes = max_bytes;
	x->zone = zone;
	x->epoch_bytes = 0;
	clock_gettime(CLOCK_MONOTONIC, &x->progress);
	x->epoch_start = x->progress;
	if (epoch_age >= 0) {
		x->epoch_start.tv_sec -= (time_t)epoch_age;
		x->epoch_bytes = 1; /* open: due by age like any other */
	}
	x->fault = 0;
	x->on = 1;
	pthread_mutex_unlock(&x->mu);
	return 1;
}

/* Take the lane and numbering back: returns once no thread here uses the lane (1), or 0 if
 * it was not lent. The books stay readable (exp_state, exp_fly, exp_epoch) until exp_on. */
int exp_take(struct express *x)
{
	pthread_mutex_lock(&x->mu);
	if (!x->on) {
		pthread_mutex_unlock(&x->mu);
		return 0;
	}
	x->taking = 1;
	while (x->reading || x->sending || x->local)
		pthread_cond_wait(&x->cv, &x->mu);
	x->on = x->taking = 0;
	x->lane = NULL;
	pthread_cond_broadcast(&x->cv);
	pthread_mutex_unlock(&x->mu);
	return 1;
}

/* Lent, and nothing of it in flight or being read: a frame arriving now is nobody's (a NACK
 * of a write acknowledged on receipt, the peer closing): the stream should take it back. */
int exp_idle(struct express *x)
{
	pthread_mutex_lock(&x->mu);
	int idle = x->on && !x->taking && !x->reading && !x->sending && !x->local && !x->nfly;
	pthread_mutex_unlock(&x->mu);
	return idle;
}

/* After exp_take: next seq, acked, last acked barrier, bytes sent, ops in flight, epochs,
 * ops served here; the failure seen here ("" if none) in reason. */
void exp_state(struct express *x, uint64_t *out, char *reason, size_t n)
{
	pthread_mutex_lock(&x->mu);
	out[0] = x->next;
	out[1] = x->acked;
	out[2] = x->last_barrier;
	out[3] = x->bytes_sent;
	out[4] = x->nfly;
	out[5] = x->nep;
	out[6] = x->served;
	snprintf(reason, n, "%s", x->broken ? x->reason : "");
	pthread_mutex_unlock(&x->mu);
}

/* Op i in flight (seq, kind, datasync, offset, length); returns its name. */
const char *exp_fly(struct express *x, uint32_t i, uint64_t *out)
{
	struct op *o = &x->fly[i];
	out[0] = o->seq;
	out[1] = o->kind;
	out[2] = o->datasync;
	out[3] = o->off;
	out[4] = o->len;
	return o->kind == K_BARRIER ? "" : x->names[o->name];
}

/* Epoch i: its barrier (0: open) and zone keys (name id << 40 | zone). */
const uint64_t *exp_epoch(struct express *x, uint32_t i, uint64_t *barrier, uint64_t *n)
{
	*barrier = x->ep[i].barrier;
	*n = x->ep[i].n;
	return x->ep[i].keys;
}

const char *exp_name(struct express *x, uint32_t id)
{
	return id < x->nnames ? x->names[id] : "";
}

/* ------------------------------------------------------------------------ the books */

static int intern(struct express *x, const char *name, uint32_t *id)
{
	for (uint32_t i = x->nnames; i-- > 0;)
		if (strcmp(x->names[i], name) == 0)
			return (*id = i), 1;
	if (x->nnames == MAXNAMES || !(x->names[x->nnames] = strdup(name)))
		return 0;
	*id = x->nnames++;
	return 1;
}

static int note_key(struct express *x, uint64_t key)
{
	struct epoch *e = &x->ep[x->nep - 1];
	size_t slot = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 52) % CACHE;
	if (x->cache_key[slot] == key && x->cache_ep[slot] == x->epoch_no)
		return 1;
	if (e->n == e->cap) {
		uint64_t cap = e->cap ? e->cap * 2 : 64, *k = realloc(e->keys, cap * sizeof *k);
		if (!k)
			return 0;
		e->keys = k;
		e->cap = cap;
	}
	e->keys[e->n++] = key;
	x->cache_key[slot] = key;
	x->cache_ep[slot] = x->epoch_no;
	return 1;
}

/* Note the zones of a write in the open epoch; 0: out of memory. */
static int note_zones(struct express *x, uint32_t name, uint64_t off, uint64_t len)
{
	for (uint64_t z = off / x->zone; len && z <= (off + len - 1) / x->zone; z++)
		if (!note_key(x, (uint64_t)name << 40 | z))
			return 0;
	return 1;
}

static void push(struct express *x, uint64_t seq, uint32_t kind, uint32_t name, uint64_t off,
		 uint64_t len, uint32_t datasync)
{
	x->fly[x->nfly++] = (struct op){seq, off, len, kind, name, datasync};
}

/* A barrier closes the open epoch when it is old or big enough (activity.py's rule). */
static int barrier_due(struct express *x)
{
	return x->epoch_bytes && (since(&x->epoch_start) >= x->max_age ||
				  x->epoch_bytes >= x->max_bytes);
}

/* Make room for one more epoch (before anything is numbered: nothing to undo). */
static int reserve_epoch(struct express *x)
{
	struct epoch *p = realloc(x->ep, (x->nep + 1) * sizeof *p);
	if (!p)
		return 0;
	x->ep = p;
	return 1;
}

static void close_epoch(struct express *x, uint64_t seq)
{
	x->ep[x->nep - 1].barrier = seq;
	x->ep[x->nep++] = (struct epoch){0, 0, 0, NULL};
	x->epoch_no++;
	x->epoch_bytes = 0;
}

static void acked(struct express *x, uint64_t upto)
{
	if (upto <= x->acked)
		return;
	x->acked = upto;
	clock_gettime(CLOCK_MONOTONIC, &x->progress);
	uint32_t k = 0;
	for (uint32_t i = 0; i < x->nfly; i++)
		if (x->fly[i].seq > upto)
			x->fly[k++] = x->fly[i];
	x->nfly = k;
	while (x->nep > 1 && x->ep[0].barrier && x->ep[0].barrier <= upto) {
		x->last_barrier = x->ep[0].barrier;
		free(x->ep[0].keys);
		memmove(x->ep, x->ep + 1, (x->nep - 1) * sizeof *x->ep);
		x->nep--;
	}
}

static void breaks(struct express *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The first failure seen here: the stream takes over (py_handover) and goes ALONE. */
static void breaks(struct express *x, const char *fmt, ...)
{
	if (!x->broken) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(x->reason, sizeof x->reason, fmt, ap);
		va_end(ap);
	}
	x->broken = 1;
	lane_shutdown(x->lane); /* a send blocked on a silent peer returns now */
}

/* ---------------------------------------------------------------------------- frames */

static unsigned char *put(unsigned char *p, uint64_t v, int n)
{
	for (int i = n - 1; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
	return p + n;
}

static unsigned char *header(unsigned char *p, uint64_t seq, uint32_t len)
{
	*p++ = F_OP;
	*p++ = 0;
	*p++ = 0;
	*p++ = 0;
	return put(put(p, seq, 8), len, 4);
}

static __thread unsigned char *fbuf;
static __thread size_t fcap;

static unsigned char *frame_room(size_t n)
{
	if (n > fcap) {
		unsigned char *p = realloc(fbuf, n);
		if (!p)
			return NULL;
		fbuf = p;
		fcap = n;
	}
	return fbuf;
}

/* Barrier (if any) + Write or Fsync frame into the thread's buffer; its length, 0: no memory.
 * A Write without data (NULL): all but its data, which the caller sends after it. */
static size_t encode(uint64_t bseq, uint64_t seq, const char *name, uint64_t off,
		     const char *data, size_t len, int kind, int datasync)
{
	size_t nl = strlen(name), need = 2 * HDR + 3 + 5 + nl + 12 + (data ? len : 0) + 2;
	unsigned char *p = frame_room(need), *s = p;
	if (!p)
		return 0;
	if (bseq) { /* Fsync(None): syncfs there */
		p = header(p, bseq, 3);
		*p++ = T_FSYNC;
		*p++ = 0;
		*p++ = 0;
	}
	if (kind == K_WRITE) {
		p = header(p, seq, (uint32_t)(1 + 4 + nl + 8 + 4 + len));
		*p++ = T_WRITE;
		p = put(p, nl, 4);
		memcpy(p, name, nl);
		p = put(p + nl, off, 8);
		p = put(p, len, 4);
		if (data) {
			memcpy(p, data, len);
			p += len;
		}
	} else {
		p = header(p, seq, (uint32_t)(1 + 1 + 4 + nl + 1));
		*p++ = T_FSYNC;
		*p++ = 1;
		p = put(p, nl, 4);
		memcpy(p, name, nl);
		p += nl;
		*p++ = (unsigned char)(datasync != 0);
	}
	return (size_t)(p - s);
}

/* Number an op, after a barrier if one is due, keep its books and encode its frame into
 * the thread's buffer (data NULL: all of a Write but its data), holding mu: its seq and the
 * frame's length, or 0 if it was not taken here (nothing numbered: the caller goes to
 * Python). */
static uint64_t book(struct express *x, uint32_t kind, const char *name, uint64_t off,
		     const char *data, size_t len, int datasync, size_t *frame)
{
	uint32_t id;
	int due = barrier_due(x);
	size_t n = 0;
	if (x->nfly + 2 > MAXFLY || !intern(x, name, &id) || (due && !reserve_epoch(x)) ||
	    !(n = encode(due ? x->next : 0, x->next + (uint64_t)due, name, off, data, len,
			 (int)kind, datasync)))
		return 0;
	if (!x->nfly) /* was idle: the no-answer clock starts now */
		clock_gettime(CLOCK_MONOTONIC, &x->progress);
	if (due) {
		close_epoch(x, x->next);
		push(x, x->next++, K_BARRIER, 0, 0, 0, 0);
	}
	uint64_t seq = x->next++;
	push(x, seq, kind, id, off, len, (uint32_t)datasync);
	if (kind == K_WRITE) {
		if (!x->epoch_bytes)
			clock_gettime(CLOCK_MONOTONIC, &x->epoch_start);
		x->epoch_bytes += len;
		if (!note_zones(x, id, off, len)) /* the stream records it dirty instead */
			breaks(x, "out of memory for the activity log");
	}
	x->served++;
	*frame = n;
	return seq;
}

/* Number and send an op (hold mu; returns with it released): its seq, or 0 if it was not
 * taken here (nothing numbered, nothing sent: the caller goes to Python). */
static uint64_t send_op(struct express *x, uint32_t kind, const char *name, uint64_t off,
			const char *data, size_t len, int datasync)
{
	size_t n = 0;
	uint64_t seq = book(x, kind, name, off, data, len, datasync, &n);
	if (!seq) {
		pthread_mutex_unlock(&x->mu);
		return 0;
	}
	x->sending++;
	struct lane *l = x->lane;
	pthread_mutex_lock(&x->send_mu);
	pthread_mutex_unlock(&x->mu);
	int rc = lane_send(l, fbuf, n);
	pthread_mutex_unlock(&x->send_mu);
	pthread_mutex_lock(&x->mu);
	int kind_ = 0;
	if (rc != 1)
		breaks(x, "send failed: %s", lane_error(l, &kind_));
	else
		x->bytes_sent += n;
	x->sending--;
	pthread_cond_broadcast(&x->cv);
	pthread_mutex_unlock(&x->mu);
	return seq;
}

/* Read one frame as the only reader (hold mu; held again on return). */
static void read_one(struct express *x)
{
	struct lane *l = x->lane;
	x->reading = 1;
	pthread_mutex_unlock(&x->mu);
	int t = lane_next(l);
	uint64_t seq = 0;
	unsigned char *p = NULL;
	uint32_t n = 0;
	if (t > 0)
		lane_frame(l, &seq, &p, &n);
	char msg[300] = "";
	uint32_t err = 0;
	if (t == F_NACK && n >= 4) {
		err = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
		snprintf(msg, sizeof msg, "%.*s (errno %u)", (int)(n - 4 > 200 ? 200 : n - 4),
			 (const char *)p + 4, err);
	} else if (t == F_NACK) {
		snprintf(msg, sizeof msg, "(no reason given)");
	} else if (t == F_ERROR) {
		snprintf(msg, sizeof msg, "%.*s", (int)(n > 250 ? 250 : n), (const char *)p);
	}
	int alive = 1;
	if (t == LANE_TIMEOUT && since(&x->progress) <= x->timeout)
		alive = x->py_alive();
	pthread_mutex_lock(&x->mu);
	x->reading = 0;
	int kind = 0;
	if (t == F_ACK)
		acked(x, seq);
	else if (t == F_NACK) {
		acked(x, seq - 1);
		breaks(x, "secondary failed op %llu: %s", (unsigned long long)seq, msg);
	} else if (t == LANE_TIMEOUT && since(&x->progress) > x->timeout)
		breaks(x, "no answer for %g s", x->timeout);
	else if (t == LANE_TIMEOUT && !alive)
		breaks(x, "silent, and the heartbeats say the peer is dead or no longer hears "
		       "this node");
	else if (t == F_ERROR)
		breaks(x, "secondary: %s", msg);
	else if (t == LANE_EOF)
		breaks(x, "the secondary closed the connection");
	else if (t == LANE_ERR)
		breaks(x, "%s", lane_error(l, &kind));
	else if (t != LANE_TIMEOUT)
		breaks(x, "unexpected frame (type %d) from the secondary", t);
	pthread_cond_broadcast(&x->cv);
}

/* Wait until op seq is acknowledged (hold mu; released on return): 0 or -errno. */
static int wait_for(struct express *x, uint64_t seq)
{
	for (;;) {
		if (x->acked >= seq)
			break;
		if (!x->on) { /* taken back: the stream has it in its books now */
			pthread_mutex_unlock(&x->mu);
			int e = x->py_wait(seq);
			return e ? -e : 0;
		}
		if (x->broken && !x->taking) {
			pthread_mutex_unlock(&x->mu);
			x->py_handover();
			pthread_mutex_lock(&x->mu);
			continue;
		}
		if (x->reading || x->taking || x->broken) {
			pthread_cond_wait(&x->cv, &x->mu);
			continue;
		}
		read_one(x);
	}
	pthread_mutex_unlock(&x->mu);
	return 0;
}

/* --------------------------------------------------------------------- FUSE handlers */

static uint64_t fh_of(struct express *x, void *fi)
{
	return *(uint64_t *)((char *)fi + x->fh_off);
}

static int usable(struct express *x, uint64_t fh)
{
	return x->on && !x->taking && !x->broken && fh < x->fhcap && x->fhok[fh];
}

/* usable() once no large write is in flight any more (hold mu): every op served here waits
 * for one, so local order and send order stay stream order. */
static int usable_next(struct express *x, uint64_t fh)
{
	while (x->local && usable(x, fh))
		pthread_cond_wait(&x->cv, &x->mu);
	return usable(x, fh);
}

/* ------------------------------------------------------------- large writes, local side */

static ssize_t pwrite1(int fd, const char *p, size_t n, off_t off)
{
	ssize_t w;
	do
		w = pwrite(fd, p, n, off);
	while (w < 0 && errno == EINTR);
	return w;
}

/* The handle's O_DIRECT twin (opened at its first large write), or -1: none. Only the large
 * write in flight (one at a time) opens or refuses twins; exp_fh closes them (never during
 * a write of that handle). */
static int twin_of(struct express *x, int fd)
{
	pthread_mutex_lock(&x->mu);
	int t = (size_t)fd < x->fhcap ? x->twin[fd] : -1;
	pthread_mutex_unlock(&x->mu);
	if (t)
		return t > 0 ? t - 1 : -1;
	struct stat st;
	char p[64];
	snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
	/* regular files only (reopening a FIFO for writing could block) */
	t = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) ?
		    open(p, O_WRONLY | O_DIRECT | O_CLOEXEC | O_NONBLOCK) : -1;
	pthread_mutex_lock(&x->mu);
	if ((size_t)fd < x->fhcap)
		x->twin[fd] = t >= 0 ? t + 1 : -1;
	else if (t >= 0) {
		close(t);
		t = -1;
	}
	pthread_mutex_unlock(&x->mu);
	return t;
}

static void refuse_twin(struct express *x, int fd)
{
	pthread_mutex_lock(&x->mu);
	int t = (size_t)fd < x->fhcap ? x->twin[fd] : 0;
	if ((size_t)fd < x->fhcap)
		x->twin[fd] = -1;
	pthread_mutex_unlock(&x->mu);
	if (t > 0)
		close(t - 1);
}

/* Through the aligned bounce buffer: how much went (short if refused or the disk fell
 * short); -1 with *err if nothing did and it was not a refusal. */
static ssize_t direct(struct express *x, int fd, int twin, const char *p, size_t n, off_t off,
		      int *err)
{
	size_t done = 0;
	while (done < n) {
		size_t k = n - done > BOUNCE ? BOUNCE : n - done;
		memcpy(x->bounce, p + done, k);
		ssize_t w = pwrite1(twin, (const char *)x->bounce, k, off + (off_t)done);
		if (w < 0) {
			if (errno == EINVAL)
				refuse_twin(x, fd);
			else if (done == 0)
				return (*err = errno), -1;
			return (ssize_t)done;
		}
		done += (size_t)w;
		if ((size_t)w < k)
			break;
	}
	return (ssize_t)done;
}

/* The local part of a large write, as directio.py does it: the 4 KiB-aligned middle straight
 * to the disk through the handle's O_DIRECT twin (copied into an aligned buffer: FUSE's is
 * not aligned), the unaligned head and tail buffered. Returns the bytes written (short only
 * where the disk fell short), or -1 with *err if nothing was. EINVAL from the twin: this file
 * system refuses O_DIRECT, the handle is served buffered from then on. */
static ssize_t local_write(struct express *x, int fd, const char *p, size_t n, off_t off,
			   int *err)
{
	size_t head = (ALIGN - (size_t)off % ALIGN) % ALIGN;
	size_t body = n > head ? (n - head) & ~(size_t)(ALIGN - 1) : 0;
	int twin = body && x->bounce ? twin_of(x, fd) : -1;
	ssize_t w;
	if (twin < 0) {
		w = pwrite1(fd, p, n, off);
		return w < 0 ? ((*err = errno), -1) : w;
	}
	size_t done = 0;
	if (head) {
		if ((w = pwrite1(fd, p, head, off)) < 0)
			return (*err = errno), -1;
		if ((size_t)w < head)
			return w;
		done = head;
	}
	w = direct(x, fd, twin, p + done, body, off + (off_t)done, err);
	if (w < 0)
		return done ? (ssize_t)done : -1;
	done += (size_t)w;
	if (done < n) { /* the tail, or what the twin refused or fell short of: buffered */
		w = pwrite1(fd, p + done, n - done, off + (off_t)done);
		if (w < 0 && !done)
			return (*err = errno), -1;
		if (w > 0)
			done += (size_t)w;
	}
	return (ssize_t)done;
}

/* The large-write sender thread: sends each posted large write while its handler writes it
 * here. Nothing else is numbered meanwhile (`local`), so nothing can send before it. */
static void *large_sender(void *arg)
{
	struct express *x = arg;
	pthread_mutex_lock(&x->mu);
	for (;;) {
		while (!x->lw_posted && x->lw_state == 1)
			pthread_cond_wait(&x->lw_cv, &x->mu);
		if (x->lw_state != 1)
			break;
		x->lw_posted = 0;
		struct lane *l = x->lw_lane;
		const unsigned char *head = x->lw_head, *data = x->lw_data;
		size_t hn = x->lw_hn, n = x->lw_size;
		pthread_mutex_unlock(&x->mu);
		pthread_mutex_lock(&x->send_mu);
		int rc = lane_send2(l, head, hn, data, n);
		pthread_mutex_unlock(&x->send_mu);
		pthread_mutex_lock(&x->mu);
		x->lw_rc = rc;
		x->lw_done = 1;
		pthread_cond_broadcast(&x->cv);
	}
	pthread_mutex_unlock(&x->mu);
	return NULL;
}

/* Start the sender thread and allocate the aligned buffer once (hold mu): 0 if they cannot
 * be had (large writes then stay in Python). */
static int large_ready(struct express *x)
{
	if (x->lw_state == 1)
		return 1;
	if (x->lw_state)
		return 0;
	void *b = NULL;
	if (posix_memalign(&b, ALIGN, BOUNCE)) {
		x->lw_state = 3;
		return 0;
	}
	x->bounce = b;
	x->lw_state = 1;
	if (pthread_create(&x->lw, NULL, large_sender, x)) {
		x->lw_state = 3;
		return 0;
	}
	return 1;
}

/* A large write: numbered, then sent straight from FUSE's buffer by the sender thread while
 * this handler writes it here, so the send, the peer's receive and the local disk write
 * overlap (as the Python path's early send does). If the local write then fails or falls
 * short, the peer may hold data this copy lacks: Python records the op dirty and resyncs
 * (py_diverged: the stream's `diverged`), and the app gets the local result, as it would
 * without replication. */
static int large_write(struct express *x, const char *path, const char *buf, size_t size,
		       off_t off, void *fi)
{
	uint64_t fh = fh_of(x, fi);
	pthread_mutex_lock(&x->mu);
	size_t hn = 0;
	uint64_t seq = 0;
	if (!x->py_diverged || !usable_next(x, fh) || !large_ready(x) ||
	    !(seq = book(x, K_WRITE, path + 1, (uint64_t)off, NULL, size, 0, &hn))) {
		pthread_mutex_unlock(&x->mu);
		return x->py_write(path, buf, size, off, fi);
	}
	struct lane *l = x->lane;
	x->local = 1;
	x->sending++;
	x->lw_lane = l;
	x->lw_head = fbuf; /* this thread's: untouched until the send is done */
	x->lw_hn = hn;
	x->lw_data = (const unsigned char *)buf;
	x->lw_size = size;
	x->lw_done = 0;
	x->lw_posted = 1;
	pthread_cond_signal(&x->lw_cv);
	pthread_mutex_unlock(&x->mu);
	int err = 0;
	ssize_t n = local_write(x, (int)fh, buf, size, off, &err);
	pthread_mutex_lock(&x->mu);
	while (!x->lw_done)
		pthread_cond_wait(&x->cv, &x->mu);
	int kind = 0;
	if (x->lw_rc != 1)
		breaks(x, "send failed: %s", lane_error(l, &kind));
	else
		x->bytes_sent += hn + size;
	x->sending--;
	x->local = 0;
	pthread_cond_broadcast(&x->cv);
	if (n == (ssize_t)size) {
		int rc = wait_for(x, seq);
		return rc ? rc : (int)n;
	}
	pthread_mutex_unlock(&x->mu);
	int e = x->py_diverged(path, (uint64_t)off, size, seq, n, err);
	if (e)
		return -e;
	return n >= 0 ? (int)n : -(err ? err : EIO);
}

int exp_write(const char *path, const char *buf, size_t size, off_t off, void *fi)
{
	struct express *x = me();
	if (!x)
		return -EIO;
	uint64_t fh = fh_of(x, fi);
	if (!path || !path[0] || !path[1] || size > LARGE || off < 0)
		return x->py_write(path, buf, size, off, fi);
	if (size >= SMALL)
		return large_write(x, path, buf, size, off, fi);
	pthread_mutex_lock(&x->mu);
	if (!usable_next(x, fh)) {
		pthread_mutex_unlock(&x->mu);
		return x->py_write(path, buf, size, off, fi);
	}
	ssize_t n;
	do
		n = pwrite((int)fh, buf, size, off);
	while (n < 0 && errno == EINTR);
	if (n <= 0) { /* Python writes it again and judges the error (a fault, ENOSPC...) */
		pthread_mutex_unlock(&x->mu);
		return x->py_write(path, buf, size, off, fi);
	}
	uint64_t seq = send_op(x, K_WRITE, path + 1, (uint64_t)off, buf, (size_t)n, 0);
	if (!seq) /* out of room here: Python sends the rest, in order (written once already) */
		return x->py_write(path, buf, size, off, fi);
	pthread_mutex_lock(&x->mu);
	int rc = wait_for(x, seq);
	return rc ? rc : (int)n;
}

int exp_fsync(const char *path, int datasync, void *fi)
{
	struct express *x = me();
	if (!x)
		return -EIO;
	uint64_t fh = fh_of(x, fi);
	if (!path || !path[0] || !path[1])
		return x->py_fsync(path, datasync, fi);
	pthread_mutex_lock(&x->mu);
	if (!usable_next(x, fh) || x->fault) {
		pthread_mutex_unlock(&x->mu);
		return x->py_fsync(path, datasync, fi);
	}
	uint64_t seq = send_op(x, K_FSYNC, path + 1, 0, NULL, 0, datasync);
	if (!seq)
		return x->py_fsync(path, datasync, fi);
	/* the secondary syncs while this node does */
	if (datasync ? fdatasync((int)fh) : fsync((int)fh)) {
		int e = errno;
		x->py_fault(path, datasync, e); /* the fault latch judges it (localfault.py) */
		exp_fault(x);
		return -e;
	}
	pthread_mutex_lock(&x->mu);
	return wait_for(x, seq);
}

/* The kernel asks for security.capability before every write of a read-write handle (to
 * drop it): a local read, answered here as mirrorfs.py's getxattr does, through the
 * directory's descriptor (the root itself followed, anything else not). */
int exp_getxattr(const char *path, const char *name, char *value, size_t size)
{
	struct express *x = me();
	if (!x || !path || path[0] != '/')
		return -EIO;
	char p[4200];
	if (snprintf(p, sizeof p, "/proc/self/fd/%d%s", x->root, path[1] ? path : "") >=
	    (int)sizeof p)
		return -ENAMETOOLONG;
	ssize_t n = path[1] ? lgetxattr(p, name, value, size) : getxattr(p, name, value, size);
	return n < 0 ? -errno : (int)n;
}
