/*
 * devstreams_auth: a Mosquitto 2.0 plugin (plugin API v5) that asks a devstreams hub's
 * auth hook about every login and every topic, so devices and services keep their SAS
 * logins on an external Mosquitto.  The protocol is in docs/protocol.md, "Auth hook
 * (external brokers)"; the config that loads this plugin is made by
 * broker/mosquitto/__init__.py (mosquitto_conf).
 *
 * Options (mosquitto.conf):
 *   plugin_opt_hook_url    http://127.0.0.1:PORT  (plain HTTP, loopback only)
 *   plugin_opt_token_file  PATH                   (the hook's bearer token, 0600)
 *   plugin_opt_timeout_ms  2000                   (connect + send + answer, per call)
 *
 * Why a hand-written HTTP client: Mosquitto calls plugins on its single thread, so the
 * call must be short and bounded (poll() with a deadline on every step), and the hook is
 * on loopback, so no TLS, proxy or redirect handling is needed; libcurl would add a
 * run-time dependency for none of that.  One connection is kept open and reused
 * (keep-alive); a call that finds it closed by the hook reconnects once.
 *
 * Only the status code decides: 200 allows, anything else (or no answer) denies.
 * Results are cached per connection (the struct mosquitto pointer, not the client id, so a
 * failed login that reuses a live client id cannot disturb the live session's cache):
 * the superuser flag from the login answer, and up to ACL_CACHE topic checks.  The cache
 * is reset by the connection's BASIC_AUTH and freed on its DISCONNECT.
 *
 * Kicks: the hub's controller (username hub:controller) publishes lines
 * "kick-client <clientid>" / "kick-user <username>" to $CONTROL/devstreams/v1; the
 * plugin disconnects those clients with their will (a kicked device's will says offline).
 *
 * Build: cc -shared -fPIC -O2 -Wall -o devstreams_auth.so devstreams_auth.c
 */

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define CONTROL_TOPIC "$CONTROL/devstreams/v1"
#define CONTROLLER_USER "hub:controller"
#define MAX_REQUEST 8192      /* a hook request larger than this is denied without asking */
#define MAX_RESPONSE 8192     /* status line + headers + body the plugin reads */
#define ACL_CACHE 32          /* topic checks remembered per connection (oldest replaced) */
#define BUCKETS 4096          /* connection cache hash table */
#define LOG_INTERVAL 10       /* s; "hook unreachable" is logged at most once per this */

struct acl_entry {
	char *topic;
	int access;
	bool allow;
};

struct session {
	struct session *next;
	const struct mosquitto *client;
	bool superuser;
	int acl_count;
	int acl_next;
	struct acl_entry acl[ACL_CACHE];
};

static mosquitto_plugin_id_t *plugin_id;
static struct in_addr hook_addr;
static int hook_port;
static char hook_host[64];
static char *token;
static int timeout_ms = 2000;
static int hook_fd = -1;
static time_t last_failure_log;
static unsigned long failures_unlogged;
static struct session *sessions[BUCKETS];

/* ---- the connection cache ---------------------------------------------------------------- */

static unsigned bucket_of(const struct mosquitto *client)
{
	uintptr_t p = (uintptr_t)client;
	return (unsigned)((p >> 4) ^ (p >> 16)) % BUCKETS;
}

static struct session *session_find(const struct mosquitto *client)
{
	struct session *s;
	for(s = sessions[bucket_of(client)]; s; s = s->next){
		if(s->client == client) return s;
	}
	return NULL;
}

static void session_free(struct session *s)
{
	int i;
	for(i = 0; i < s->acl_count; i++) free(s->acl[i].topic);
	free(s);
}

static void session_drop(const struct mosquitto *client)
{
	struct session **link = &sessions[bucket_of(client)];
	while(*link){
		if((*link)->client == client){
			struct session *s = *link;
			*link = s->next;
			session_free(s);
			return;
		}
		link = &(*link)->next;
	}
}

static struct session *session_new(const struct mosquitto *client)
{
	struct session *s;
	session_drop(client);
	s = calloc(1, sizeof(*s));
	if(!s) return NULL;
	s->client = client;
	s->next = sessions[bucket_of(client)];
	sessions[bucket_of(client)] = s;
	return s;
}

static int acl_cached(struct session *s, const char *topic, int access)
{
	int i;
	for(i = 0; i < s->acl_count; i++){
		if(s->acl[i].access == access && !strcmp(s->acl[i].topic, topic)) return s->acl[i].allow ? 1 : 0;
	}
	return -1;
}

static void acl_remember(struct session *s, const char *topic, int access, bool allow)
{
	char *copy = strdup(topic);
	int slot;
	if(!copy) return;
	if(s->acl_count < ACL_CACHE){
		slot = s->acl_count++;
	}else{
		slot = s->acl_next;
		s->acl_next = (s->acl_next + 1) % ACL_CACHE;
		free(s->acl[slot].topic);
	}
	s->acl[slot].topic = copy;
	s->acl[slot].access = access;
	s->acl[slot].allow = allow;
}

/* ---- a minimal HTTP/1.1 client ------------------------------------------------------------ */

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void hook_failed(const char *what, int err)
{
	time_t now = time(NULL);
	if(now - last_failure_log >= LOG_INTERVAL){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
			"devstreams_auth: auth hook http://%s:%d %s (%s); denying (%lu more failures since the last line)",
			hook_host, hook_port, what, err ? strerror(err) : "no answer", failures_unlogged);
		last_failure_log = now;
		failures_unlogged = 0;
	}else{
		failures_unlogged++;
	}
}

static void hook_close(void)
{
	if(hook_fd >= 0) close(hook_fd);
	hook_fd = -1;
}

static int wait_fd(int fd, short events, long long deadline)
{
	struct pollfd p = {fd, events, 0};
	for(;;){
		long long left = deadline - now_ms();
		int rc;
		if(left <= 0) return 0;
		rc = poll(&p, 1, (int)left);
		if(rc > 0) return 1;
		if(rc == 0) return 0;
		if(errno != EINTR) return -1;
	}
}

static int hook_connect(long long deadline)
{
	struct sockaddr_in sa;
	int fd, err = 0, one = 1;
	socklen_t len = sizeof(err);

	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if(fd < 0){ hook_failed("socket failed", errno); return -1; }
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)hook_port);
	sa.sin_addr = hook_addr;
	if(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0){
		if(errno != EINPROGRESS){ hook_failed("unreachable", errno); close(fd); return -1; }
		if(wait_fd(fd, POLLOUT, deadline) <= 0){ hook_failed("connect timed out", 0); close(fd); return -1; }
		if(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err){
			hook_failed("unreachable", err); close(fd); return -1;
		}
	}
	return fd;
}

/* Is the kept connection still usable?  A hook that closed it (idle timeout) makes it readable. */
static bool hook_alive(void)
{
	struct pollfd p = {hook_fd, POLLIN, 0};
	return hook_fd >= 0 && poll(&p, 1, 0) == 0;
}

/* One request on the current connection.  Returns the status code, 0 if no byte of an answer
 * came (the caller may retry on a fresh connection), or -1 on a failure not worth a retry. */
static int hook_exchange(const char *req, size_t req_len, long long deadline, char *answer, size_t answer_len)
{
	char buf[MAX_RESPONSE + 1];
	size_t sent = 0, got = 0;
	char *end, *p;
	int status;
	long content_length = -1;
	bool keep = true;

	while(sent < req_len){
		ssize_t n = send(hook_fd, req + sent, req_len - sent, MSG_NOSIGNAL);
		if(n > 0){ sent += (size_t)n; continue; }
		if(n < 0 && errno == EINTR) continue;
		if(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)){
			if(wait_fd(hook_fd, POLLOUT, deadline) <= 0){ hook_failed("send timed out", 0); return -1; }
			continue;
		}
		return 0;  /* EPIPE / ECONNRESET on a kept connection: retry once */
	}
	for(;;){
		ssize_t n;
		buf[got] = '\0';
		end = strstr(buf, "\r\n\r\n");
		if(end){
			size_t head = (size_t)(end + 4 - buf);
			for(p = buf; p < end; p++) if(*p >= 'A' && *p <= 'Z') *p = (char)(*p + 32);
			p = strstr(buf, "\r\ncontent-length:");
			if(p) content_length = strtol(p + 17, NULL, 10);
			if(strstr(buf, "\r\nconnection: close")) keep = false;
			if(content_length >= 0 && head + (size_t)content_length <= got) break;
			if(content_length < 0 || head + (size_t)content_length > MAX_RESPONSE){
				keep = false;  /* cannot stay in step with this answer: read the status, drop the link */
				break;
			}
		}
		if(got >= MAX_RESPONSE){ keep = false; break; }
		if(wait_fd(hook_fd, POLLIN, deadline) <= 0){ hook_failed("answer timed out", 0); return -1; }
		n = recv(hook_fd, buf + got, MAX_RESPONSE - got, 0);
		if(n > 0){ got += (size_t)n; continue; }
		if(n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
		if(got == 0) return 0;
		keep = false;
		buf[got] = '\0';
		break;
	}
	if(sscanf(buf, "http/1.%*d %d", &status) != 1 && sscanf(buf, "HTTP/1.%*d %d", &status) != 1){
		hook_failed("sent a malformed answer", 0);
		return -1;
	}
	if(answer_len && end){
		snprintf(answer, answer_len, "%s", end + 4);
	}
	if(!keep) hook_close();
	return status;
}

/* POST a JSON body; the status code, or -1 when the hook could not be asked. */
static int hook_post(const char *path, const char *json, char *answer, size_t answer_len)
{
	char req[MAX_REQUEST + 512];
	int len, attempt, status;
	long long deadline = now_ms() + timeout_ms;

	len = snprintf(req, sizeof(req),
		"POST %s HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
		"Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
		path, hook_host, hook_port, token, strlen(json), json);
	if(len < 0 || (size_t)len >= sizeof(req)) return -1;
	if(answer_len) answer[0] = '\0';
	for(attempt = 0; attempt < 2; attempt++){
		bool reused = hook_alive();
		if(!reused){
			hook_close();
			hook_fd = hook_connect(deadline);
			if(hook_fd < 0) return -1;
		}
		status = hook_exchange(req, (size_t)len, deadline, answer, answer_len);
		if(status == 401){  /* a config error, not a decision: say so, or every login fails silently */
			hook_failed("refused the token (401): plugin_opt_token_file must be the hub's keys/auth-hook.token", 0);
			return -1;
		}
		if(status > 0 && status != 200 && status != 403){
			hook_failed("answered an unexpected status", 0);
			return -1;  /* deny, but do not cache: the next check asks again */
		}
		if(status > 0) return status;
		hook_close();
		if(status < 0 || !reused){
			if(status == 0) hook_failed("closed the connection", 0);
			return -1;
		}
	}
	return -1;
}

/* Append s to out as a JSON string; false if it does not fit. */
static bool json_string(char *out, size_t cap, size_t *pos, const char *s)
{
	const unsigned char *c;
	if(*pos + 1 >= cap) return false;
	out[(*pos)++] = '"';
	for(c = (const unsigned char *)(s ? s : ""); *c; c++){
		if(*pos + 8 >= cap) return false;
		if(*c == '"' || *c == '\\'){
			out[(*pos)++] = '\\';
			out[(*pos)++] = (char)*c;
		}else if(*c < 0x20){
			*pos += (size_t)snprintf(out + *pos, cap - *pos, "\\u%04x", *c);
		}else{
			out[(*pos)++] = (char)*c;
		}
	}
	if(*pos + 1 >= cap) return false;
	out[(*pos)++] = '"';
	out[*pos] = '\0';
	return true;
}

static bool json_field(char *out, size_t cap, size_t *pos, const char *name, const char *value, bool first)
{
	int n = snprintf(out + *pos, cap - *pos, "%s\"%s\":", first ? "{" : ",", name);
	if(n < 0 || *pos + (size_t)n >= cap) return false;
	*pos += (size_t)n;
	return json_string(out, cap, pos, value);
}

/* ---- events ------------------------------------------------------------------------------- */

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	char body[MAX_REQUEST], answer[512];
	size_t pos = 0;
	int status;
	struct session *s;
	(void)event; (void)userdata;

	session_drop(ed->client);
	if(!ed->username || !ed->password || !ed->username[0]) return MOSQ_ERR_AUTH;
	if(!json_field(body, sizeof(body), &pos, "clientid", client_id, true)
			|| !json_field(body, sizeof(body), &pos, "username", ed->username, false)
			|| !json_field(body, sizeof(body), &pos, "password", ed->password, false)
			|| pos + 2 > sizeof(body)){
		return MOSQ_ERR_AUTH;
	}
	body[pos++] = '}';
	body[pos] = '\0';
	status = hook_post("/mqtt/auth", body, answer, sizeof(answer));
	/* No verdict (the hook is down or slow) is not a refusal: Mosquitto then closes the
	 * connection without "not authorized", so a client retries later instead of taking
	 * its credentials for revoked. */
	if(status < 0) return MOSQ_ERR_UNKNOWN;
	if(status != 200) return MOSQ_ERR_AUTH;
	s = session_new(ed->client);
	if(s){  /* a superuser (the hub's controller) skips the per-topic calls */
		s->superuser = strstr(answer, "\"is_superuser\":true") || strstr(answer, "\"is_superuser\": true");
	}
	return MOSQ_ERR_SUCCESS;
}

static const char *action_of(int access)
{
	switch(access){
		case MOSQ_ACL_READ: return "receive";
		case MOSQ_ACL_WRITE: return "publish";
		case MOSQ_ACL_SUBSCRIBE: return "subscribe";
		default: return NULL;
	}
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *action;
	struct session *s = session_find(ed->client);
	char body[MAX_REQUEST];
	size_t pos = 0;
	int cached, status;
	(void)event; (void)userdata;

	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	action = action_of(ed->access);
	if(!action || !ed->topic) return MOSQ_ERR_ACL_DENIED;
	if(s && s->superuser) return MOSQ_ERR_SUCCESS;
	if(s && (cached = acl_cached(s, ed->topic, ed->access)) >= 0){
		return cached ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
	}
	if(!json_field(body, sizeof(body), &pos, "clientid", mosquitto_client_id(ed->client), true)
			|| !json_field(body, sizeof(body), &pos, "username", mosquitto_client_username(ed->client), false)
			|| !json_field(body, sizeof(body), &pos, "topic", ed->topic, false)
			|| !json_field(body, sizeof(body), &pos, "action", action, false)
			|| pos + 2 > sizeof(body)){
		return MOSQ_ERR_ACL_DENIED;
	}
	body[pos++] = '}';
	body[pos] = '\0';
	status = hook_post("/mqtt/acl", body, NULL, 0);
	if(status < 0) return MOSQ_ERR_ACL_DENIED;  /* not cached: the next check asks again */
	if(s) acl_remember(s, ed->topic, ed->access, status == 200);
	return status == 200 ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	(void)event; (void)userdata;
	session_drop(ed->client);
	return MOSQ_ERR_SUCCESS;
}

static int on_control(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_control *ed = event_data;
	const char *sender = mosquitto_client_username(ed->client);
	char *text, *line, *save = NULL;
	(void)event; (void)userdata;

	if(!sender || strcmp(sender, CONTROLLER_USER)){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "devstreams_auth: ignored a kick from %s (only %s may kick)",
			mosquitto_client_id(ed->client) ? mosquitto_client_id(ed->client) : "?", CONTROLLER_USER);
		return MOSQ_ERR_SUCCESS;
	}
	text = malloc(ed->payloadlen + 1);
	if(!text) return MOSQ_ERR_NOMEM;
	memcpy(text, ed->payload, ed->payloadlen);
	text[ed->payloadlen] = '\0';
	for(line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)){
		size_t n = strlen(line);
		if(n && line[n - 1] == '\r') line[n - 1] = '\0';
		if(!strncmp(line, "kick-client ", 12) && line[12]){
			mosquitto_log_printf(MOSQ_LOG_NOTICE, "devstreams_auth: kicking client %s", line + 12);
			mosquitto_kick_client_by_clientid(line + 12, true);
		}else if(!strncmp(line, "kick-user ", 10) && line[10]){
			mosquitto_log_printf(MOSQ_LOG_NOTICE, "devstreams_auth: kicking user %s", line + 10);
			mosquitto_kick_client_by_username(line + 10, true);
		}else if(line[0]){
			mosquitto_log_printf(MOSQ_LOG_WARNING, "devstreams_auth: unknown control line ignored");
		}
	}
	free(text);
	return MOSQ_ERR_SUCCESS;
}

/* ---- plugin entry points ------------------------------------------------------------------ */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int parse_url(const char *url)
{
	char host[64];
	int port, consumed = 0;
	if(sscanf(url, "http://%63[0-9.]:%d%n", host, &port, &consumed) != 2
			|| (url[consumed] != '\0' && strcmp(url + consumed, "/"))
			|| port < 1 || port > 65535
			|| inet_pton(AF_INET, host, &hook_addr) != 1
			|| (ntohl(hook_addr.s_addr) >> 24) != 127){
		mosquitto_log_printf(MOSQ_LOG_ERR,
			"devstreams_auth: plugin_opt_hook_url must be http://127.x.y.z:PORT (plain HTTP to loopback only), not %s",
			url);
		return -1;
	}
	snprintf(hook_host, sizeof(hook_host), "%s", host);
	hook_port = port;
	return 0;
}

static int read_token(const char *path)
{
	char buf[512];
	size_t n;
	FILE *f = fopen(path, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, "devstreams_auth: cannot read plugin_opt_token_file %s: %s",
			path, strerror(errno));
		return -1;
	}
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	while(n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ')) buf[--n] = '\0';
	if(n < 16 || strpbrk(buf, "\r\n ")){
		mosquitto_log_printf(MOSQ_LOG_ERR, "devstreams_auth: %s does not hold a hook token", path);
		return -1;
	}
	token = strdup(buf);
	return token ? 0 : -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	const char *url = NULL, *token_file = NULL;
	int i;
	(void)userdata;

	for(i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "hook_url")) url = options[i].value;
		else if(!strcmp(options[i].key, "token_file")) token_file = options[i].value;
		else if(!strcmp(options[i].key, "timeout_ms")){
			timeout_ms = atoi(options[i].value);
			if(timeout_ms < 1 || timeout_ms > 60000){
				mosquitto_log_printf(MOSQ_LOG_ERR, "devstreams_auth: plugin_opt_timeout_ms must be 1..60000");
				return MOSQ_ERR_INVAL;
			}
		}
	}
	if(!url || !token_file){
		mosquitto_log_printf(MOSQ_LOG_ERR,
			"devstreams_auth: plugin_opt_hook_url and plugin_opt_token_file are required (see 'devstreams hub broker-config')");
		return MOSQ_ERR_INVAL;
	}
	if(parse_url(url) || read_token(token_file)) return MOSQ_ERR_INVAL;
	plugin_id = identifier;
	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC, NULL)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "devstreams_auth: cannot register callbacks");
		return MOSQ_ERR_UNKNOWN;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "devstreams_auth: asking the auth hook at %s", url);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	int i;
	(void)userdata; (void)options; (void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_CONTROL, on_control, CONTROL_TOPIC);
	for(i = 0; i < BUCKETS; i++){
		while(sessions[i]){
			struct session *s = sessions[i];
			sessions[i] = s->next;
			session_free(s);
		}
	}
	hook_close();
	free(token);
	token = NULL;
	return MOSQ_ERR_SUCCESS;
}
