-- wxd.xml: decoding untrusted XML (refusals, limits, shapes) and encoding.
local xml = require "wxd.xml"
local messages = require "fixtures.mp.messages"

local ARRAYS = { arrays = { item = true } }

-- Fails unless decode refuses s with err (and a detail that says where).
local function refused(s, err, opts)
  local t, e, detail = xml.decode(s, opts)
  assert.is_nil(t)
  assert.equal(err, e)
  assert.equal("string", type(detail))
  return detail
end

describe("wxd.xml.decode", function()
  it("maps the root's children to fields and returns the root's name", function()
    local t, root = xml.decode("<xml><A><![CDATA[hi]]></A><B>12</B><C/><D></D></xml>")
    assert.same({ A = "hi", B = "12", C = "", D = "" }, t)
    assert.equal("xml", root)
  end)

  it("concatenates plain text and CDATA and trims nothing", function()
    local t = xml.decode("<xml><a>  x <![CDATA[ y ]]> z\n</a><b><![CDATA[]]></b><c><![CDATA[\n\t]]></c></xml>")
    assert.equal("  x  y  z\n", t.a)
    assert.equal("", t.b)
    assert.equal("\n\t", t.c)
  end)

  it("keeps markup inside CDATA as text", function()
    local t = xml.decode("<xml><a><![CDATA[<b>&amp;</b>]]></a></xml>")
    assert.equal("<b>&amp;</b>", t.a)
  end)

  it("decodes the predefined entities and character references only", function()
    local t = xml.decode("<xml><a>&lt;&gt;&amp;&apos;&quot;&#65;&#x42;&#x4E2D;</a></xml>")
    assert.equal("<>&'\"AB中", t.a)
    refused("<xml><a>&nbsp;</a></xml>", "invalid xml")
    refused("<xml><a>&#0;</a></xml>", "invalid xml")
  end)

  it("nests elements with children as tables and ignores whitespace between them", function()
    local t = xml.decode("<xml>\n  <ScanCodeInfo>\n    <ScanType><![CDATA[qrcode]]></ScanType>\n"
      .. "    <ScanResult><![CDATA[1]]></ScanResult>\n  </ScanCodeInfo>\n</xml>\n")
    assert.same({ ScanCodeInfo = { ScanType = "qrcode", ScanResult = "1" } }, t)
  end)

  it("turns repeated names into arrays, in document order", function()
    local t = xml.decode("<xml><a>1</a><b>x</b><a>2</a><a>3</a></xml>")
    assert.same({ a = { "1", "2", "3" }, b = "x" }, t)
    t = xml.decode("<xml><l><i><v>1</v></i><i><v>2</v></i></l></xml>")
    assert.same({ l = { i = { { v = "1" }, { v = "2" } } } }, t)
  end)

  it("makes opts.arrays names arrays even when they appear once", function()
    local t = xml.decode("<xml><Articles><item><Title>t</Title></item></Articles><item>x</item></xml>", ARRAYS)
    assert.same({ Articles = { item = { { Title = "t" } } }, item = { "x" } }, t)
    t = xml.decode("<xml><Articles><item><Title>t</Title></item><item><Title>u</Title></item></Articles></xml>", ARRAYS)
    assert.same({ { Title = "t" }, { Title = "u" } }, t.Articles.item)
  end)

  it("ignores attributes, comments, processing instructions and the declaration", function()
    local t, root = xml.decode('<?xml version="1.0" encoding="UTF-8"?><!-- c --><r a="1"><?pi x?><x y="2">v</x></r>')
    assert.same({ x = "v" }, t)
    assert.equal("r", root)
  end)

  it("gives an empty table for a root without children", function()
    local t, root = xml.decode("<xml>text only</xml>")
    assert.same({}, t)
    assert.equal("xml", root)
  end)

  it("reads other declared encodings into UTF-8", function()
    local t = xml.decode('<?xml version="1.0" encoding="ISO-8859-1"?><xml><a>\233</a></xml>')
    assert.equal("\195\169", t.a)
  end)

  describe("refuses", function()
    it("an external entity (XXE) without reading the file", function()
      local s = '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        .. "<xml><Content>&xxe;</Content></xml>"
      local detail = refused(s, "doctype not allowed")
      assert.falsy(detail:find("root:", 1, true))
      refused('<!DOCTYPE xml SYSTEM "file:///etc/passwd"><xml>&xxe;</xml>', "doctype not allowed")
      refused('<!DOCTYPE xml [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x.dtd"> %p;]><xml/>', "doctype not allowed")
    end)

    it("entity expansion (billion laughs, quadratic blowup)", function()
      local lol = { '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">' }
      for i = 1, 9 do
        local prev = i == 1 and "lol" or ("lol" .. (i - 1))
        lol[#lol + 1] = '<!ENTITY lol' .. i .. ' "' .. string.rep("&" .. prev .. ";", 10) .. '">'
      end
      lol[#lol + 1] = "]><lolz>&lol9;</lolz>"
      refused(table.concat(lol), "doctype not allowed")
      local big = string.rep("x", 50000)
      refused('<!DOCTYPE x [<!ENTITY a "' .. big .. '">]><x>' .. string.rep("&a;", 1000) .. "</x>", "doctype not allowed")
    end)

    it("a DOCTYPE of any kind", function()
      for _, s in ipairs({
        "<!DOCTYPE xml><xml/>",
        '<!DOCTYPE xml PUBLIC "-//W3C//DTD XHTML 1.0//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd"><xml/>',
        "<!DOCTYPE xml [<!ELEMENT xml ANY>]><xml/>",
        "<!DOCTYPE xml [<!ATTLIST xml a CDATA 'x'>]><xml/>",
        '<?xml version="1.0" standalone="yes"?>\n<!DOCTYPE xml [ ]>\n<xml/>',
      }) do
        refused(s, "doctype not allowed")
      end
    end)

    it("an undefined entity", function()
      refused("<xml><a>&xxe;</a></xml>", "invalid xml")
    end)

    it("more than max_bytes, before parsing", function()
      local big = "<xml><a>" .. string.rep("a", xml.MAX_BYTES) .. "</a></xml>"
      refused(big, "too large")
      refused("<xml><a>12345</a></xml>", "too large", { max_bytes = 10 })
      assert.truthy(xml.decode("<xml><a>1</a></xml>", { max_bytes = 19 }))
    end)

    it("nesting deeper than max_depth (default 32)", function()
      local function nest(n) return string.rep("<a>", n) .. "x" .. string.rep("</a>", n) end
      assert.truthy(xml.decode(nest(32)))
      refused(nest(33), "too deep")
      refused(nest(100000), "too deep")
      refused(nest(4), "too deep", { max_depth = 3 })
    end)

    it("more elements than max_elements (default 10000)", function()
      assert.truthy(xml.decode("<xml>" .. string.rep("<a/>", 9999) .. "</xml>"))
      refused("<xml>" .. string.rep("<a/>", 10000) .. "</xml>", "too many elements")
      refused("<xml><a/><a/></xml>", "too many elements", { max_elements = 2 })
    end)

    it("malformed XML of many shapes, with a position and without echoing the input", function()
      local cases = {
        "", " ", "SECRET", "<", "<xml", "<xml>", "<xml></xmL>", "<xml><a></xml>", "<xml></a></xml>",
        "<xml/><xml/>", "<xml/>SECRET", "SECRET<xml/>", "<xml><a>1</b></xml>", "<1xml/>", "<xml a=1/>",
        '<xml a="1" a="2"/>', "<xml>&</xml>", "<xml>&amp</xml>", "<xml>&#xZZ;</xml>", "<xml>&#1114112;</xml>",
        "<xml><![CDATA[x</xml>", "<xml><!-- x </xml>", "<xml>\0</xml>", "<xml>\1</xml>", "<xml>\255\254</xml>",
        "<xml><a>\192\128</a></xml>", "<?xml version='1.0'?>", "<xml></xml>\0",
        "<x:a xmlns:x='u'><x:b></x:a>", "<xml><a><b></a></b></xml>", string.rep("<", 1000),
        '<?xml version="1.0" encoding="NOPE"?><xml/>', "<xml>]]></xml>", "<xml><a b=\"<\"/></xml>",
      }
      for _, s in ipairs(cases) do
        local t, err, detail = xml.decode(s)
        assert.is_nil(t, "accepted: " .. s)
        assert.equal("invalid xml", err, "for " .. s)
        assert.truthy(detail:match("^line %d+, column %d+: "), detail)
        assert.falsy(detail:find("SECRET", 1, true))
      end
    end)

    it("random bytes and truncations of a real message without crashing", function()
      math.randomseed(6)
      local msg = messages.get("pic_photo_or_album").xml
      for i = 0, #msg - 1 do
        local t = xml.decode(msg:sub(1, i))
        assert.is_nil(t)
      end
      for _ = 1, 2000 do
        local s = msg
        for _ = 1, math.random(1, 4) do
          local p = math.random(1, #s)
          s = s:sub(1, p - 1) .. string.char(math.random(0, 255)) .. s:sub(p + 1)
        end
        local t, err = xml.decode(s, ARRAYS)
        assert.truthy(t or err)
      end
    end)
  end)

  it("raises for arguments of the wrong type", function()
    assert.has_error(function() xml.decode(nil) end)
    assert.has_error(function() xml.decode(12) end)
    assert.has_error(function() xml.decode("<a/>", "x") end)
    assert.has_error(function() xml.decode("<a/>", { arrays = "item" }) end)
    assert.has_error(function() xml.decode("<a/>", { max_depth = 0 }) end)
    assert.has_error(function() xml.decode("<a/>", { max_bytes = -1 }) end)
  end)
end)

describe("wxd.xml.encode", function()
  it("writes strings as CDATA, numbers as text, in _order then sorted", function()
    local s = xml.encode({ Z = "z", CreateTime = 1348831860, Content = "hi", A = 1.5, B = true,
                           _order = { "Content", "CreateTime", "Missing" } })
    assert.equal("<xml><Content><![CDATA[hi]]></Content><CreateTime>1348831860</CreateTime>"
      .. "<A>1.5</A><B>true</B><Z><![CDATA[z]]></Z></xml>", s)
  end)

  it("splits ]]> between two CDATA sections", function()
    local s = xml.encode({ a = "x]]>y]]>" })
    assert.equal("<xml><a><![CDATA[x]]]]><![CDATA[>y]]]]><![CDATA[>]]></a></xml>", s)
    assert.equal("x]]>y]]>", xml.decode(s).a)
  end)

  it("writes nested tables as elements and arrays as repeated elements", function()
    local s = xml.encode({ ArticleCount = 2, Articles = { item = { { Title = "a", _order = { "Title" } }, { Title = "b" } } },
                           _order = { "ArticleCount", "Articles" } })
    assert.equal("<xml><ArticleCount>2</ArticleCount><Articles><item><Title><![CDATA[a]]></Title></item>"
      .. "<item><Title><![CDATA[b]]></Title></item></Articles></xml>", s)
  end)

  it("takes another root name", function()
    assert.equal("<root><a>1</a></root>", xml.encode({ a = 1 }, "root"))
  end)

  it("writes integers exactly and other numbers round-trippably", function()
    local t = xml.decode(xml.encode({ a = 2 ^ 53 - 1, b = -7, c = 0.1 }))
    assert.equal("9007199254740991", t.a)
    assert.equal("-7", t.b)
    assert.equal(0.1, tonumber(t.c))
  end)

  it("raises for what has no XML form", function()
    assert.has_error(function() xml.encode("x") end)
    assert.has_error(function() xml.encode({ ["bad name"] = "x" }) end)
    assert.has_error(function() xml.encode({ ["1a"] = "x" }) end)
    assert.has_error(function() xml.encode({ a = function() end }) end)
    assert.has_error(function() xml.encode({ a = 0 / 0 }) end)
    assert.has_error(function() xml.encode({ a = math.huge }) end)
    assert.has_error(function() xml.encode({ a = "bell\7" }) end)
    assert.has_error(function() xml.encode({ "array at the root" }) end)
    assert.has_error(function() xml.encode({ a = { { "nested" } } }) end)
    assert.has_error(function() xml.encode({ a = 1 }, "bad root") end)
    local cyc = {}
    cyc.self = cyc
    assert.has_error(function() xml.encode(cyc) end)
  end)
end)

describe("WeChat messages", function()
  for _, m in ipairs(messages) do
    it("decodes and round-trips " .. m.name, function()
      local t, root = xml.decode(m.xml, ARRAYS)
      assert.equal("xml", root)
      assert.equal(messages.ACCOUNT, t.ToUserName)
      assert.equal(messages.USER, t.FromUserName)
      assert.truthy(tonumber(t.CreateTime))
      for k, v in pairs(m.fields) do
        if type(v) == "table" then
          -- Compare the given part of nested fields.
          for k2, v2 in pairs(v) do assert.same(v2, t[k][k2]) end
        else
          assert.equal(v, t[k], m.name .. "." .. k)
        end
      end
      local again = xml.decode(xml.encode(t), ARRAYS)
      assert.same(t, again)
    end)
  end
end)
