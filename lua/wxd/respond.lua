--- wxd.respond: the response conventions of two API generations
-- (docs/api-versions.md).
--
-- * `envelope` (the old generation): every body is `{ code, message, data }`
--   with an integer `code`, 0 for success; an error code's first three
--   digits are its HTTP status (4001 → 400, 4041 → 404).
-- * `problem` (the new generation): errors are RFC 9457 problem details,
--   `application/problem+json`, with the HTTP status doing the work.
-- * `paginate`: RFC 8288 `Link` headers (first, prev, next, last).
--
-- @module wxd.respond
local json = require "wxd.json"

local type, pairs, tostring, floor, concat = type, pairs, tostring, math.floor, table.concat

local _M = {}

local REASONS = {
  [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden", [404] = "Not Found",
  [405] = "Method Not Allowed", [406] = "Not Acceptable", [409] = "Conflict", [410] = "Gone",
  [413] = "Content Too Large", [415] = "Unsupported Media Type", [422] = "Unprocessable Content",
  [429] = "Too Many Requests", [500] = "Internal Server Error", [502] = "Bad Gateway",
  [503] = "Service Unavailable", [504] = "Gateway Timeout",
}

------------------------------------------------------------------------
-- v2: envelope with integer codes
------------------------------------------------------------------------

local envelope = {}
_M.envelope = envelope

--- Success: `200, { code = 0, message = "ok", data = data }`.
function envelope.ok(data)
  return 200, { code = 0, message = "ok", data = data == nil and json.null or data }
end

--- An error: the HTTP status is the code's first three digits (4001 →
-- 400) unless `status` is given; `data` is null unless given.
function envelope.err(code, message, status, data)
  if type(code) ~= "number" or code % 1 ~= 0 or code < 1000 or code > 99999 then
    error("wxd.respond.envelope.err: code must be an integer like 4001", 2)
  end
  local s = status
  if not s then
    s = floor(code / 10 ^ (#tostring(code) - 3))
    if s < 400 or s > 599 then s = 400 end
  end
  return s, { code = code, message = message or REASONS[s] or "error", data = data == nil and json.null or data }
end

--- Install envelope answers for 404, 405 and 500 on an app or group
-- (codes 4040, 4050 and 5000).
function envelope.on_error(g)
  g:on_error(404, function() return envelope.err(4040, "not found") end)
  g:on_error(405, function() return envelope.err(4050, "method not allowed") end)
  g:on_error(500, function(req) return envelope.err(5000, "internal error (request id " .. tostring(req.id) .. ")") end)
  return g
end

------------------------------------------------------------------------
-- v3: RFC 9457 problem details
------------------------------------------------------------------------

local problem = {}
_M.problem = problem
problem.CONTENT_TYPE = "application/problem+json"

--- A problem response: sets the content type on `res` and returns
-- `status, body`. `fields` may hold `type` (a URI, default "about:blank"),
-- `title` (default the status's reason phrase), `detail`, `instance` and
-- extension members.
-- @usage return problem.new(res, 404, { detail = "no order " .. id })
function problem.new(res, status, fields)
  local body = {}
  for k, v in pairs(fields or {}) do body[k] = v end
  body.type = body.type or "about:blank"
  body.title = body.title or REASONS[status] or "Error"
  body.status = status
  res.headers["Content-Type"] = problem.CONTENT_TYPE
  return status, body
end

--- Install problem answers for 404, 405 and 500 on an app or group.
function problem.on_error(g)
  g:on_error(404, function(req, res) return problem.new(res, 404, { instance = req.path }) end)
  g:on_error(405, function(req, res) return problem.new(res, 405, { instance = req.path }) end)
  g:on_error(500, function(req, res) return problem.new(res, 500, { request_id = req.id }) end)
  return g
end

--- A `fail(req, res, status, err, description)` for wxd.jwt.bearer's
-- `on_fail`: the refusal as a problem.
function problem.bearer_fail(_, res, status, err, desc)
  return problem.new(res, status, { detail = desc, error = err })
end

------------------------------------------------------------------------
-- RFC 8288 pagination
------------------------------------------------------------------------

--- The page the request asks for: `page` (1-based, default 1) and
-- `per_page` (default `default`, at most `max`) from the query; nil,
-- "bad page" for values that are not positive integers.
function _M.page_of(req, default, max)
  local q = req.query
  local page = tonumber(q.page or "1")
  local per = tonumber(q.per_page or tostring(default or 20))
  if not page or not per or page < 1 or per < 1 or page % 1 ~= 0 or per % 1 ~= 0 then
    return nil, "bad page"
  end
  if max and per > max then per = max end
  return page, per
end

--- Set `Link` (first, prev, next, last; RFC 8288) on `res` for a list of
-- `total` items shown `per_page` at a time, page `page`; the request's
-- other query parameters are kept. Also sets `X-Total-Count`.
function _M.paginate(req, res, page, per_page, total)
  local last = total > 0 and math.ceil(total / per_page) or 1
  local keep = {}
  for part in (req.query_string or ""):gmatch("[^&]+") do
    local name = part:match("^([^=]*)")
    if name ~= "page" and name ~= "per_page" then keep[#keep + 1] = part end
  end
  local base = req.path .. "?" .. (keep[1] and concat(keep, "&") .. "&" or "")
  local function link(p, rel)
    return "<" .. base .. "page=" .. p .. "&per_page=" .. per_page .. '>; rel="' .. rel .. '"'
  end
  local links = { link(1, "first") }
  if page > 1 then links[#links + 1] = link(math.min(page - 1, last), "prev") end
  if page < last then links[#links + 1] = link(page + 1, "next") end
  links[#links + 1] = link(last, "last")
  res.headers["Link"] = concat(links, ", ")
  res.headers["X-Total-Count"] = tostring(total)
  return res
end

return _M
