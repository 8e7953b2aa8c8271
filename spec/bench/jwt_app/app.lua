-- The app of spec/bench/jwt.sh: /hello without and with RS256 bearer
-- verification (the key from JWT_PUBLIC_KEY, a PEM file).
local jwt = require "wxd.jwt"
local app = require("wxd.app").new()
local key = jwt.key({ alg = "RS256", file = os.getenv("JWT_PUBLIC_KEY") })

app:get("/hello", function() return "hello world\n" end)
app:group("/jwt", function(g)
  g:before(jwt.bearer({ keys = { key }, audience = "bench" }))
  g:get("/hello", function() return "hello world\n" end)
end)
return app
