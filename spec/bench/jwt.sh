#!/bin/sh
# Cost of RS256 bearer verification per request (issue 20): req/s of a
# /hello handler without and with jwt.bearer (RSA-2048), one worker, wrk
# with 1 thread and 16 connections. Usage: spec/bench/jwt.sh [seconds]
set -e
WXD=${WXD:-build/wxd}
D=$(mktemp -d)
trap 'kill $PID 2>/dev/null; rm -rf "$D"' EXIT
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$D/k.pem" 2>/dev/null
openssl pkey -in "$D/k.pem" -pubout -out "$D/k.pub"
cat >"$D/sign.lua" <<LUA
local jwt = require "wxd.jwt"
local f = io.open("$D/k.pem") local pem = f:read("*a") f:close()
io.write(jwt.sign({ sub = "u1", aud = "bench" }, jwt.key({ alg = "RS256", pem = pem }), { expires_in = 3600 }))
LUA
TOKEN=$($WXD script "$D/sign.lua")
PORT=${PORT:-18777}
JWT_PUBLIC_KEY="$D/k.pub" $WXD run spec/bench/jwt_app --listen 127.0.0.1:$PORT --workers 1 >"$D/log" 2>&1 &
PID=$!
for _ in 1 2 3 4 5 6 7 8 9 10; do curl -sf "http://127.0.0.1:$PORT/hello" >/dev/null && break; sleep 0.3; done
test "$(curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/jwt/hello")" = "hello world"
S=${1:-5}
echo "without: $(wrk -t1 -c16 -d${S}s "http://127.0.0.1:$PORT/hello" | awk '/Requests\/sec/ {print $2}') req/s"
echo "with RS256: $(wrk -t1 -c16 -d${S}s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/jwt/hello" | awk '/Requests\/sec/ {print $2}') req/s"
