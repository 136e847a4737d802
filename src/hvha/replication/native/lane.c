/* Both ends of a replication session in C: TLS and frames; on the secondary, Writes, Fsyncs
 * and acks too.
 *
 * Why: every synchronous write crosses the secondary twice per round trip (read the op,
 * write it, send the ack), and in Python that costs about 80-130 us of interpreter per round
 * trip on the lab machine (docs/benchmarks.md). This file does the common case natively: it
 * reads frames, applies Writes and Fsyncs to files it has open, and sends the cumulative
 * acks. A large Write is acknowledged once received, just before it is applied (DRBD's
 * protocol B for writes): the primary's next write crosses the network while this one goes
 * to the disk. An Fsync is acknowledged only once it and everything before it are done, and
 * the primary's activity log (activity.py) keeps every write not yet behind an acknowledged
 * barrier, so a write that fails here after its ack still reaches the dirty map. Every
 * other frame (namespace ops, queries) and every case it is not sure of is handed to the
 * Python applier (applier.py via lane.py), which applies it as before and tells
 * this side what it applied. On the primary, the stream (stream.py) sends its frames and reads
 * the acks through a lane: one thread may read while others send. lane_shutdown() may be
 * called from any thread; lane_close() only once no other call is in progress (lane.py).
 *
 * Wire format: see wire.py (frame header: type u8, flags u8, reserved u16, seq u64, length
 * u32, big-endian; a Write payload: tag 2, path (u32 + bytes), offset i64, data (u32 + bytes);
 * an Fsync: tag 16, presence byte + optional path, datasync byte).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HDR 16
#define MAX_PAYLOAD (8u << 20)
#define INBUF (512u << 10)
#define RAW (256u << 10)
#define OBUF (256u << 10)
#define SEND_PIECE (256u << 10)
#define ALIGN 4096u
#define DIRECT_MIN (128u << 10)
#define BOUNCE (1u << 20)
#define NFILES 64
/* Writes at least this large are acknowledged on receipt, before they are applied */
#define EARLY_ACK (128u << 10)

enum { F_HELLO = 1, F_OP, F_ACK, F_NACK, F_QUERY, F_REPLY, F_ERROR, F_SKIPPED };
enum { T_CREATE = 1, T_WRITE = 2, T_FSYNC = 16 };
enum { LANE_EOF = 0, LANE_ERR = -1, LANE_TIMEOUT = -2 };
enum { E_OS = 1, E_PROTOCOL = 2, E_TLS = 3, E_TIMEOUT = 4 };

struct file {
	char *path;
	int fd, twin; /* twin: O_DIRECT descriptor, -2 not opened yet, -1 refused */
	uint64_t used;
};

struct lane {
	int fd;
	SSL_CTX *ctx;
	SSL *ssl;
	BIO *rbio, *wbio; /* ciphertext in and out (owned by ssl) */
	pthread_mutex_t mu, send_mu;
	int reply_due; /* bytes the reader produced wait in wbio for the next sender */
	unsigned char *raw, *obuf; /* ciphertext received / to send */
	unsigned char *in; /* decrypted bytes in[pos, len) not yet consumed */
	size_t pos, len;
	int partial; /* a frame is being read: 1 into in[], 2 into big (after a timeout) */
	size_t big_have;
	unsigned char *big, *bounce; /* aligned: large payloads, direct writes of unaligned data */
	size_t big_cap;
	int ftype, failed; /* the frame handed out, and the errno of its failed fast apply */
	uint64_t fseq;
	unsigned char *payload;
	uint32_t plen;
	size_t consume; /* bytes of in[] the handed-out frame occupies */
	int64_t expected, applied, acked;
	uint64_t unacked;
	struct timespec since;
	int root;
	struct file files[NFILES];
	uint64_t tick;
	int err_kind;
	char err[512];
};

static int fail(struct lane *l, int kind, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int fail(struct lane *l, int kind, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(l->err, sizeof l->err, fmt, ap);
	va_end(ap);
	l->err_kind = kind;
	return LANE_ERR;
}

static uint32_t be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const unsigned char *p)
{
	return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static void put64(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

/* --------------------------------------------------------------------------- session */

/* TLS runs over memory BIOs: the SSL object is only touched under `mu`, and the socket I/O
 * happens outside it, so one thread may read while another writes (the primary's stream
 * does: acks are read while ops are sent). `send_mu` keeps records in order on the socket. */

static int send_all(struct lane *l, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = send(l->fd, p, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return fail(l, E_TIMEOUT, "send timed out");
		if (w <= 0)
			return fail(l, E_OS, "send failed: %s", strerror(w < 0 ? errno : EPIPE));
		p += w;
		n -= (size_t)w;
	}
	return 1;
}

/* Send what TLS has produced (hold send_mu). */
static int drain(struct lane *l)
{
	for (;;) {
		pthread_mutex_lock(&l->mu);
		int k = BIO_read(l->wbio, l->obuf, OBUF);
		pthread_mutex_unlock(&l->mu);
		if (k <= 0)
			return 1;
		if (send_all(l, l->obuf, (size_t)k) != 1)
			return LANE_ERR;
	}
}

static int flush_out(struct lane *l)
{
	pthread_mutex_lock(&l->send_mu);
	int rc = drain(l);
	pthread_mutex_unlock(&l->send_mu);
	return rc;
}

/* Send what reading produced. Never wait for send_mu here: a sender holding it may be
 * blocked on a full socket until this thread reads; it sends the bytes itself (drain reads
 * all of wbio), and `reply_due` makes it look again after letting go of send_mu. */
static void reply(struct lane *l)
{
	if (pthread_mutex_trylock(&l->send_mu) == 0) {
		drain(l);
		pthread_mutex_unlock(&l->send_mu);
	} else {
		__atomic_store_n(&l->reply_due, 1, __ATOMIC_SEQ_CST);
	}
}

/* One recv() of ciphertext into the SSL object: 1, LANE_EOF, LANE_TIMEOUT or LANE_ERR. */
static int feed(struct lane *l)
{
	ssize_t k;
	do
		k = recv(l->fd, l->raw, RAW, 0);
	while (k < 0 && errno == EINTR);
	if (k == 0)
		return LANE_EOF;
	if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return LANE_TIMEOUT;
	if (k < 0)
		return fail(l, E_OS, "connection lost: %s", strerror(errno));
	pthread_mutex_lock(&l->mu);
	BIO_write(l->rbio, l->raw, (int)k);
	pthread_mutex_unlock(&l->mu);
	return 1;
}

static void tls_reason(char *buf, size_t n)
{
	unsigned long e = ERR_get_error();
	if (e)
		ERR_error_string_n(e, buf, n);
	else
		snprintf(buf, n, "%s", strerror(errno ? errno : EPROTO));
	ERR_clear_error();
}

struct lane *lane_open(int fd, int client, const char *cert, const char *key, const char *ca,
		       const char *peer, char *err, size_t errlen)
{
	struct lane *l = calloc(1, sizeof *l);
	if (!l) {
		snprintf(err, errlen, "out of memory");
		close(fd);
		return NULL;
	}
	l->fd = fd;
	l->root = -1;
	l->expected = -1;
	for (int i = 0; i < NFILES; i++)
		l->files[i].fd = l->files[i].twin = -1;
	pthread_mutex_init(&l->mu, NULL);
	pthread_mutex_init(&l->send_mu, NULL);
	l->in = malloc(INBUF);
	l->raw = malloc(RAW);
	l->obuf = malloc(OBUF);
	l->ctx = SSL_CTX_new(client ? TLS_client_method() : TLS_server_method());
	const char *what = "TLS context";
	if (!l->in || !l->raw || !l->obuf || !l->ctx)
		goto bad;
	SSL_CTX_set_min_proto_version(l->ctx, TLS1_3_VERSION);
	SSL_CTX_set_max_proto_version(l->ctx, TLS1_3_VERSION);
	SSL_CTX_set_num_tickets(l->ctx, 0);
	SSL_CTX_set_verify(l->ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
	what = "CA certificate";
	if (SSL_CTX_load_verify_locations(l->ctx, ca, NULL) != 1)
		goto bad;
	what = "certificate";
	if (SSL_CTX_use_certificate_chain_file(l->ctx, cert) != 1)
		goto bad;
	what = "key";
	if (SSL_CTX_use_PrivateKey_file(l->ctx, key, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_check_private_key(l->ctx) != 1)
		goto bad;
	what = "handshake";
	l->ssl = SSL_new(l->ctx);
	l->rbio = BIO_new(BIO_s_mem());
	l->wbio = BIO_new(BIO_s_mem());
	if (!l->ssl || !l->rbio || !l->wbio)
		goto bad;
	BIO_set_mem_eof_return(l->rbio, -1);
	SSL_set_bio(l->ssl, l->rbio, l->wbio);
	if (client) { /* the server's certificate must name the peer node */
		if (SSL_set1_host(l->ssl, peer) != 1 || SSL_set_tlsext_host_name(l->ssl, peer) != 1)
			goto bad;
		SSL_set_connect_state(l->ssl);
	} else {
		SSL_set_accept_state(l->ssl);
	}
	for (;;) {
		ERR_clear_error();
		int rc = SSL_do_handshake(l->ssl);
		int e = rc == 1 ? 0 : SSL_get_error(l->ssl, rc);
		if (e != 0 && e != SSL_ERROR_WANT_READ)
			goto bad;
		if (flush_out(l) != 1) {
			snprintf(err, errlen, "handshake: %s", l->err);
			goto free;
		}
		if (rc == 1)
			break;
		int f = feed(l);
		if (f != 1) {
			snprintf(err, errlen, "handshake: %s", f == LANE_EOF ? "the peer closed the "
				 "connection" : f == LANE_TIMEOUT ? "timed out" : l->err);
			goto free;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &l->since);
	return l;
bad: {
	char reason[256];
	tls_reason(reason, sizeof reason);
	snprintf(err, errlen, "%s: %s", what, reason);
}
free:
	if (l->ssl)
		SSL_free(l->ssl); /* frees the BIOs it owns */
	else {
		BIO_free(l->rbio);
		BIO_free(l->wbio);
	}
	if (l->ctx)
		SSL_CTX_free(l->ctx);
	free(l->in);
	free(l->raw);
	free(l->obuf);
	close(fd);
	free(l);
	return NULL;
}

/* The peer's certificate (DER) into buf; its length, 0 if none, -1 if buf is too small. */
int lane_peer_cert(struct lane *l, unsigned char *buf, int n)
{
	X509 *x = SSL_get1_peer_certificate(l->ssl);
	if (!x)
		return 0;
	int len = i2d_X509(x, NULL);
	if (len > 0 && len <= n) {
		unsigned char *p = buf;
		len = i2d_X509(x, &p);
	} else if (len > n) {
		len = -1;
	}
	X509_free(x);
	return len;
}

static void forget_files(struct lane *l)
{
	for (int i = 0; i < NFILES; i++) {
		struct file *f = &l->files[i];
		if (f->fd >= 0)
			close(f->fd);
		if (f->twin >= 0)
			close(f->twin);
		free(f->path);
		f->path = NULL;
		f->fd = f->twin = -1;
	}
}

void lane_shutdown(struct lane *l)
{
	shutdown(l->fd, SHUT_RDWR);
}

void lane_close(struct lane *l)
{
	forget_files(l);
	SSL_free(l->ssl);
	SSL_CTX_free(l->ctx);
	close(l->fd);
	pthread_mutex_destroy(&l->mu);
	pthread_mutex_destroy(&l->send_mu);
	free(l->in);
	free(l->raw);
	free(l->obuf);
	free(l->big);
	free(l->bounce);
	free(l);
}

const char *lane_error(struct lane *l, int *kind)
{
	*kind = l->err_kind;
	return l->err;
}

/* ---------------------------------------------------------------------------- frames */

/* Encrypt and send data, in pieces so the peer decrypts the first while this side encrypts
 * the next (hold send_mu). drain 0: leave the record in TLS's buffer, sent with the next. */
static int send_pieces(struct lane *l, const unsigned char *data, size_t n, int drain_now)
{
	int rc = 1;
	while (n && rc == 1) {
		size_t k = n > SEND_PIECE ? SEND_PIECE : n, done = 0;
		pthread_mutex_lock(&l->mu);
		ERR_clear_error();
		int ok = SSL_write_ex(l->ssl, data, k, &done);
		char reason[256] = "";
		if (ok != 1)
			tls_reason(reason, sizeof reason);
		pthread_mutex_unlock(&l->mu);
		if (ok != 1)
			return fail(l, E_TLS, "send failed: %s", reason);
		if (drain_now)
			rc = drain(l);
		data += done;
		n -= done;
	}
	return rc;
}

/* Any thread; records stay in order. */
int lane_send(struct lane *l, const unsigned char *data, size_t n)
{
	pthread_mutex_lock(&l->send_mu);
	int rc = send_pieces(l, data, n, 1);
	pthread_mutex_unlock(&l->send_mu);
	if (__atomic_exchange_n(&l->reply_due, 0, __ATOMIC_SEQ_CST))
		flush_out(l);
	return rc;
}

/* A frame in two parts (a Write's header, then its data straight from the caller's buffer,
 * without a copy into one frame): one record sequence, nothing between them. */
int lane_send2(struct lane *l, const unsigned char *head, size_t hn, const unsigned char *data,
	       size_t n)
{
	pthread_mutex_lock(&l->send_mu);
	int rc = send_pieces(l, head, hn, 0);
	if (rc == 1)
		rc = n ? send_pieces(l, data, n, 1) : drain(l);
	pthread_mutex_unlock(&l->send_mu);
	if (__atomic_exchange_n(&l->reply_due, 0, __ATOMIC_SEQ_CST))
		flush_out(l);
	return rc;
}

static int send_frame(struct lane *l, int type, uint64_t seq)
{
	unsigned char h[HDR] = {(unsigned char)type, 0, 0, 0};
	put64(h + 4, seq);
	return lane_send(l, h, HDR);
}

/* Decrypt at most n bytes into dst (one thread reads at a time): >0 bytes, LANE_EOF,
 * LANE_TIMEOUT (nothing lost: call again) or LANE_ERR. */
static long tls_read(struct lane *l, unsigned char *dst, size_t n)
{
	for (;;) {
		size_t got = 0;
		pthread_mutex_lock(&l->mu);
		size_t before = BIO_ctrl_pending(l->wbio);
		ERR_clear_error();
		int rc = SSL_read_ex(l->ssl, dst, n, &got);
		int e = rc == 1 ? 0 : SSL_get_error(l->ssl, rc);
		char reason[256] = "";
		if (e != 0 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_ZERO_RETURN)
			tls_reason(reason, sizeof reason);
		/* did reading produce something to send (an alert, a key update)? Senders' own
		 * records may sit in wbio too: those are theirs to send */
		int out = BIO_ctrl_pending(l->wbio) > before;
		pthread_mutex_unlock(&l->mu);
		if (out)
			reply(l);
		if (rc == 1)
			return (long)got;
		if (e == SSL_ERROR_ZERO_RETURN)
			return LANE_EOF;
		if (e != SSL_ERROR_WANT_READ)
			return fail(l, E_TLS, "TLS: %s", reason);
		int f = feed(l);
		if (f != 1)
			return f;
	}
}

/* Make in[pos, pos + need) available; 1, LANE_EOF, LANE_TIMEOUT or LANE_ERR. */
static int fill(struct lane *l, size_t need)
{
	if (l->pos + need > INBUF) {
		memmove(l->in, l->in + l->pos, l->len - l->pos);
		l->len -= l->pos;
		l->pos = 0;
	}
	while (l->len - l->pos < need) {
		long n = tls_read(l, l->in + l->len, INBUF - l->len);
		if (n <= 0)
			return (int)n;
		l->len += (size_t)n;
	}
	return 1;
}

/* Where the data of a well-formed Write payload starts, or 0. */
static uint32_t write_start(const unsigned char *p, size_t have, uint32_t plen)
{
	if (have < 5 || p[0] != T_WRITE)
		return 0;
	uint64_t n = be32(p + 1);
	uint64_t start = 5 + n + 12;
	if (have < start || start > plen || start + be32(p + start - 4) != plen)
		return 0;
	return (uint32_t)start;
}

/* Read the next frame: its type, LANE_EOF, LANE_TIMEOUT (call again: the partial frame is
 * kept) or LANE_ERR. Its payload stays valid until the next call. A large Write is received
 * so that its data's first aligned file offset falls on a page boundary (direct writes go
 * from the frame itself). */
int lane_next(struct lane *l)
{
	int rc;
	if (l->partial == 0) {
		l->pos += l->consume;
		l->consume = 0;
		l->failed = 0;
		if ((rc = fill(l, HDR)) <= 0)
			return rc;
		const unsigned char *h = l->in + l->pos;
		int type = h[0];
		uint32_t plen = be32(h + 12);
		if (type < F_HELLO || type > F_SKIPPED)
			return fail(l, E_PROTOCOL, "unknown frame type %d", type);
		if (plen > MAX_PAYLOAD)
			return fail(l, E_PROTOCOL, "frame of %u bytes exceeds the %u limit", plen,
				    MAX_PAYLOAD);
		l->ftype = type;
		l->fseq = be64(h + 4);
		l->plen = plen;
		l->partial = 1;
		if (plen > INBUF - HDR) {
			/* kept for the next large frame, grown to the largest seen (writes are
			 * usually 1-4 MiB: no 8 MiB per session unless frames are that large) */
			size_t need = ((size_t)plen + 2 * ALIGN + (1u << 20) - 1) & ~(size_t)((1u << 20) - 1);
			if (need > l->big_cap) {
				free(l->big);
				l->big_cap = 0;
				if (posix_memalign((void **)&l->big, ALIGN, need)) {
					l->big = NULL;
					return fail(l, E_OS, "out of memory");
				}
				l->big_cap = need;
			}
			size_t have = l->len - l->pos - HDR;
			const unsigned char *head = l->in + l->pos + HDR;
			uint32_t start = type == F_OP ? write_start(head, have, plen) : 0;
			size_t pad = 0;
			if (start) {
				uint64_t off = be64(head + start - 12);
				pad = (ALIGN - (start + (ALIGN - off % ALIGN) % ALIGN) % ALIGN) % ALIGN;
			}
			l->payload = l->big + pad;
			memcpy(l->payload, head, have);
			l->big_have = have;
			l->pos = l->len = 0;
			l->partial = 2;
		}
	}
	if (l->partial == 1) {
		if ((rc = fill(l, HDR + l->plen)) <= 0)
			return rc;
		l->payload = l->in + l->pos + HDR;
		l->consume = HDR + l->plen;
	} else {
		while (l->big_have < l->plen) {
			long n = tls_read(l, l->payload + l->big_have, l->plen - l->big_have);
			if (n <= 0)
				return (int)n;
			l->big_have += (size_t)n;
		}
	}
	l->partial = 0;
	return l->ftype;
}

/* ---------------------------------------------------------------------------- apply */

static int check_path(const unsigned char *p, uint32_t n)
{
	if (n == 0 || p[0] == '/' || memchr(p, 0, n))
		return 0;
	uint32_t i = 0;
	while (i <= n) {
		uint32_t j = i;
		while (j < n && p[j] != '/')
			j++;
		uint32_t k = j - i;
		if (k == 0 || (k == 1 && p[i] == '.') || (k == 2 && p[i] == '.' && p[i + 1] == '.'))
			return 0;
		i = j + 1;
	}
	return 1;
}

/* The cached file for path, or NULL; with open_it, opened (regular files only) if needed. */
static struct file *file_of(struct lane *l, const unsigned char *path, uint32_t n, int open_it)
{
	struct file *free_slot = NULL, *old = &l->files[0];
	for (int i = 0; i < NFILES; i++) {
		struct file *f = &l->files[i];
		if (f->fd < 0) {
			free_slot = free_slot ? free_slot : f;
			continue;
		}
		if (strlen(f->path) == n && memcmp(f->path, path, n) == 0) {
			f->used = ++l->tick;
			return f;
		}
		if (f->used < old->used)
			old = f;
	}
	if (!open_it || l->root < 0)
		return NULL;
	char *name = strndup((const char *)path, n);
	if (!name)
		return NULL;
	struct open_how how = {.flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW,
			       .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
					  RESOLVE_NO_MAGICLINKS};
	int fd = (int)syscall(SYS_openat2, l->root, name, &how, sizeof how);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) || !S_ISREG(st.st_mode)) {
		if (fd >= 0)
			close(fd);
		free(name);
		return NULL;
	}
	struct file *f = free_slot;
	if (!f) {
		f = old;
		close(f->fd);
		if (f->twin >= 0)
			close(f->twin);
		free(f->path);
	}
	f->path = name;
	f->fd = fd;
	f->twin = -2;
	f->used = ++l->tick;
	return f;
}

/* pwrite all of it: 0, or an errno. */
static int write_all(int fd, const unsigned char *p, size_t n, uint64_t off)
{
	while (n) {
		ssize_t w = pwrite(fd, p, n, (off_t)off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		if (w == 0)
			return ENOSPC;
		p += w;
		n -= (size_t)w;
		off += (uint64_t)w;
	}
	return 0;
}

/* The aligned middle through the O_DIRECT twin: bytes written (all, or fewer if the file
 * system refuses O_DIRECT: the caller writes the rest buffered), or -errno. */
static long write_direct(struct lane *l, struct file *f, const unsigned char *p, size_t n,
			 uint64_t off)
{
	if (f->twin == -2) {
		char proc[64];
		snprintf(proc, sizeof proc, "/proc/self/fd/%d", f->fd);
		f->twin = open(proc, O_WRONLY | O_DIRECT | O_CLOEXEC | O_NONBLOCK);
		if (f->twin < 0)
			f->twin = -1;
	}
	if (f->twin < 0)
		return 0;
	size_t done = 0;
	while (done < n) {
		const unsigned char *src = p + done;
		size_t k = n - done;
		if ((uintptr_t)src % ALIGN) {
			if (!l->bounce && posix_memalign((void **)&l->bounce, ALIGN, BOUNCE))
				return (long)done;
			k = k > BOUNCE ? BOUNCE : k;
			memcpy(l->bounce, src, k);
			src = l->bounce;
		}
		ssize_t w = pwrite(f->twin, src, k, (off_t)(off + done));
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EINVAL) { /* no O_DIRECT here after all */
			close(f->twin);
			f->twin = -1;
			return (long)done;
		}
		if (w < 0)
			return -errno;
		if (w == 0)
			return -ENOSPC;
		done += (size_t)w;
	}
	return (long)done;
}

/* The file a Write payload targets, if this side applies it (a well-formed Write of a safe
 * path to a regular file it can open); NULL: hand the frame over. */
static struct file *write_target(struct lane *l, uint32_t *start)
{
	const unsigned char *p = l->payload;
	*start = write_start(p, l->plen, l->plen);
	if (!*start)
		return NULL;
	uint32_t n = be32(p + 1);
	if (!check_path(p + 5, n))
		return NULL;
	return file_of(l, p + 5, n, 1);
}

/* Write the data of the Write in l->payload to f: 1 applied, -errno failed. */
static int apply_write(struct lane *l, struct file *f, uint32_t start)
{
	const unsigned char *p = l->payload;
	uint64_t off = be64(p + start - 12);
	const unsigned char *data = p + start;
	size_t len = l->plen - start, head = (ALIGN - off % ALIGN) % ALIGN, body = 0;
	if (len >= DIRECT_MIN && len > head)
		body = (len - head) & ~(size_t)(ALIGN - 1);
	int e;
	if (!body)
		return (e = write_all(f->fd, data, len, off)) ? -e : 1;
	if (head && (e = write_all(f->fd, data, head, off)))
		return -e;
	long d = write_direct(l, f, data + head, body, off + head);
	if (d < 0)
		return (int)d;
	size_t done = head + (size_t)d;
	return (e = write_all(f->fd, data + done, len - done, off + done)) ? -e : 1;
}

/* Apply an Fsync of a file written here (or a syncfs): 1, 0 (hand it over), -errno. */
static int apply_fsync(struct lane *l, int dirs_dirty)
{
	const unsigned char *p = l->payload;
	if (dirs_dirty || l->plen < 3)
		return 0;
	/* anything but a well-formed Fsync goes to the Python side, which refuses it */
	if (p[1] == 0) { /* no path: every file (syncfs) */
		if (l->plen != 3 || p[2] > 1 || l->root < 0)
			return 0;
		return syncfs(l->root) ? -errno : 1;
	}
	if (p[1] != 1 || l->plen < 7)
		return 0;
	uint32_t n = be32(p + 2);
	if ((uint64_t)7 + n != l->plen || p[6 + n] > 1)
		return 0;
	struct file *f = file_of(l, p + 6, n, 0);
	if (!f)
		return 0;
	return (p[6 + n] ? fdatasync(f->fd) : fsync(f->fd)) ? -errno : 1;
}

static double since_ms(struct lane *l)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - l->since.tv_sec) * 1e3 +
	       (double)(now.tv_nsec - l->since.tv_nsec) / 1e6;
}

/* Bytes received (plain or still encrypted) that the next lane_next() would start from. */
int lane_pending(struct lane *l)
{
	if (l->partial || l->len - l->pos - l->consume > 0)
		return 1;
	pthread_mutex_lock(&l->mu);
	int p = SSL_pending(l->ssl) > 0 || BIO_ctrl_pending(l->rbio) > 0;
	pthread_mutex_unlock(&l->mu);
	return p;
}

/* Acknowledge what is applied if it is time to: nothing more is waiting to be read, or
 * enough is unacknowledged (the applier's policy, as in the Python loop before). */
static int maybe_ack(struct lane *l, int now)
{
	if (l->applied <= l->acked)
		return 1;
	if (!now && lane_pending(l) && l->applied - l->acked < 64 && l->unacked < (4u << 20) &&
	    since_ms(l) <= 5.0)
		return 1;
	if (send_frame(l, F_ACK, (uint64_t)l->applied) != 1)
		return LANE_ERR;
	l->acked = l->applied;
	l->unacked = 0;
	clock_gettime(CLOCK_MONOTONIC, &l->since);
	return 1;
}

/* Op `seq` of `n` payload bytes was applied (by the Python side); ack if it is time to. */
int lane_applied(struct lane *l, int64_t seq, uint32_t n)
{
	l->applied = seq;
	l->unacked += n;
	return maybe_ack(l, 0);
}

int lane_flush_ack(struct lane *l)
{
	return maybe_ack(l, 1);
}

/* Serve the session: apply Writes and Fsyncs of files this side has open, acknowledge, and
 * return the first frame it leaves to the caller (its type; lane_frame() gives it), or
 * LANE_EOF, or LANE_ERR. A frame whose fast apply failed is returned with its errno set
 * (lane_frame: failed): the caller reports it and must not apply it again (a failed fsync
 * must never be retried into a success). */
int lane_serve(struct lane *l, int root, int dirs_dirty)
{
	l->root = root;
	for (;;) {
		int type = lane_next(l);
		if (type <= 0 || type != F_OP)
			return type;
		if (l->expected >= 0 && l->fseq != (uint64_t)l->expected)
			return fail(l, E_PROTOCOL, "op %llu out of order, %lld expected",
				    (unsigned long long)l->fseq, (long long)l->expected);
		l->expected = (int64_t)l->fseq + 1;
		int tag = l->plen ? l->payload[0] : 0, rc = 0;
		uint32_t start = 0;
		struct file *f = tag == T_WRITE ? write_target(l, &start) : NULL;
		if (f && l->plen >= EARLY_ACK) {
			/* received and about to be applied, before anything later: acknowledge it
			 * now, so the primary's next write travels while this one goes to the disk
			 * (the acks stay cumulative; an Fsync is only acknowledged once done) */
			l->applied = (int64_t)l->fseq;
			if (maybe_ack(l, 1) != 1)
				return LANE_ERR;
			rc = apply_write(l, f, start); /* a failure ends the session (applier.py) */
		} else if (f)
			rc = apply_write(l, f, start);
		else if (tag == T_FSYNC)
			rc = apply_fsync(l, dirs_dirty);
		else if (tag != T_WRITE)
			forget_files(l); /* names may change: reopen by name afterwards */
		if (rc < 0) {
			l->failed = -rc;
			return type;
		}
		if (rc == 0)
			return type;
		if (lane_applied(l, (int64_t)l->fseq, l->plen) != 1)
			return LANE_ERR;
	}
}

/* The frame last returned: its seq, payload and length, and the errno of its failed fast
 * apply (0: not tried, the caller applies it). */
int lane_frame(struct lane *l, uint64_t *seq, unsigned char **payload, uint32_t *len)
{
	*seq = l->fseq;
	*payload = l->payload;
	*len = l->plen;
	return l->failed;
}
