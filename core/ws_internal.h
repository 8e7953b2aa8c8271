/* ws_internal: what core/ws.c, wstopic.c and the HTTP files share about
 * WebSocket connections. The module's interface is ws.h. */
#ifndef WXD_WS_INTERNAL_H
#define WXD_WS_INTERNAL_H

#include "buf.h"
#include "vm.h"
#include "ws.h"

struct wxd_conn;
struct ws_topic;
typedef struct wxd_ws wxd_ws_t;

/* A connection's membership of a topic. */
typedef struct wxd_ws_sub {
  struct wxd_ws_sub *prev, *next; /* the topic's subscribers on this worker */
  struct wxd_ws_sub *ws_next;     /* the connection's other subscriptions */
  struct ws_topic *topic;
  wxd_ws_t *ws;
} wxd_ws_sub_t;

/* A complete message waiting for ws:receive(). */
typedef struct ws_msg {
  struct ws_msg *next;
  char *data; /* malloc'ed (the assembly buffer, handed over); NULL when empty */
  size_t len;
  int binary;
} ws_msg_t;

enum { WS_OPEN = 0, WS_CLOSE_SENT, WS_CLOSED };

struct wxd_ws {
  struct wxd_conn *conn;  /* NULL once the connection is gone */
  wxd_co_t *handler;      /* the handler's coroutine while it runs */
  wxd_co_t *reader;       /* a coroutine waiting in ws:receive() */
  wxd_co_t *writer;       /* a coroutine waiting for the client to read */
  struct ws_box *box;     /* the Lua userdata, NULL once collected */
  wxd_ws_topics_t *topics;
  int worker;
  wxd_ws_sub_t *subs;
  ws_msg_t *q_head, *q_tail; /* complete messages not yet received */
  size_t q_bytes;
  wxd_buf_t msg;          /* the data message being assembled */
  uint64_t left;          /* payload bytes of the current frame to come */
  uint64_t last_rx;       /* loop time (ms) of the last bytes from the client */
  uint64_t recv_deadline; /* the reader's timeout; 0 none */
  uint64_t close_deadline;/* closing: give up on the client then; 0 none */
  uint32_t max_frame, max_message, max_unsent, ping_ms, idle_ms, close_ms;
  wxd_utf8_t utf8;        /* of the text message in progress */
  uint8_t hdr[14];        /* frame header bytes so far */
  uint8_t hdr_have, hdr_need;
  uint8_t mask[4];
  uint8_t mask_pos;
  uint8_t opcode, fin;    /* of the current frame */
  uint8_t msg_opcode;     /* 1 text, 2 binary while a message is in progress; 0 none */
  uint8_t in_payload;     /* the header is complete */
  uint8_t state;          /* WS_* */
  uint8_t ctrl_len;
  uint8_t ctrl[125];      /* payload of the current control frame */
  uint16_t close_code;    /* the client's close code (1005 none, 1006 no close frame) */
  unsigned read_paused : 1; /* the queue is full: bytes wait in conn->in */
  unsigned ping_out : 1;    /* a keep-alive ping is unanswered */
  unsigned shut : 1;        /* our side of the TCP connection is shut down */
  unsigned failed : 1;      /* closed for a protocol error or limit */
  unsigned close_pending : 1; /* the client's close waits behind queued messages */
  wxd_ws_t *defer_next;     /* closed during a delivery: woken after it (wstopic.c) */
};

/* ws.c, called by the HTTP files for a connection with c->ws set. */
void wxd__ws_input(struct wxd_conn *c, const char *data, size_t len);
void wxd__ws_input_end(struct wxd_conn *c);
void wxd__ws_conn_closing(struct wxd_conn *c);
void wxd__ws_conn_closed(struct wxd_conn *c);
void wxd__ws_sweep(struct wxd_conn *c, uint64_t now);
void wxd__ws_drain(struct wxd_conn *c);
void wxd__ws_on_drain(struct wxd_conn *c);
/* Writes a published frame (header and payload) to one subscriber. */
void wxd__ws_deliver(wxd_ws_t *ws, const char *frame, size_t len);
/* Wakes the coroutines waiting on a connection that closed. */
void wxd__ws_wake_closed(wxd_ws_t *ws);

/* wstopic.c */
size_t wxd__ws_frame_head(uint8_t *h, int opcode, uint64_t len);
int wxd__ws_subscribe(wxd_ws_topics_t *t, int id, wxd_ws_t *ws, const char *name, size_t n);
int wxd__ws_unsubscribe(wxd_ws_topics_t *t, int id, wxd_ws_t *ws, const char *name, size_t n);
void wxd__ws_unsubscribe_all(wxd_ws_topics_t *t, int id, wxd_ws_t *ws);
/* While worker id delivers a publish (walking a topic's subscribers), a
 * connection that closes must not run Lua (which could change the list):
 * returns 1 and wakes its coroutines once the walk is over; 0 otherwise. */
int wxd__ws_defer_wake(wxd_ws_topics_t *t, int id, wxd_ws_t *ws);

#endif
