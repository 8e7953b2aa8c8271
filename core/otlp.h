/* otlp: the OTLP/HTTP JSON body of a batch of spans (see otlp.c). */
#ifndef WXD_OTLP_H
#define WXD_OTLP_H

#include <lua.h>

/* Lua module wxd.core.otlp: encode(spans, service_name, instance_id, version). */
int wxd_open_otlp(lua_State *L);

#endif
