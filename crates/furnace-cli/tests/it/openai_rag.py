"""RAG over uploaded documents against a running `furnace serve`: uploads (multipart and
JSON), listing, queries, retrieval chats with the official OpenAI client, deletion.

Usage: openai_rag.py BASE_URL BASE_MODEL

Asserts each step; prints one JSON object with what was observed.
"""

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

import openai

base_url, base = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
seen = {}


class Answer:
    """An HTTP answer: status_code, text and json(), like the common client libraries'."""

    def __init__(self, status, body):
        self.status_code, self.text = status, body.decode()

    def json(self):
        return json.loads(self.text)


class Http:
    """Plain urllib with the base URL; multipart forms built by hand (no extra packages)."""

    def request(self, method, path, body=None, headers=None, params=None):
        url = base_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return Answer(r.status, r.read())
        except urllib.error.HTTPError as e:
            return Answer(e.code, e.read())

    def get(self, path, params=None):
        return self.request("GET", path, params=params)

    def delete(self, path):
        return self.request("DELETE", path)

    def post(self, path, json=None, data=None, files=None):
        if json is not None:
            return self.request("POST", path, body=__import__("json").dumps(json).encode(), headers={"Content-Type": "application/json"})
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (data or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, content, ctype) in files or []:
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
            parts.append(head.encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request("POST", path, body=b"".join(parts), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


http = Http()

SECRET = "The secret code of the furnace project is PURPLE-HARBOR-42. It was chosen by the team in November."
OTHER = "# Gardening\n\nTomatoes need full sun and regular watering. Basil grows well next to tomatoes.\n"

# Multipart upload of two files into one collection.
r = http.post(
    "/documents",
    data={"collection": "notes"},
    files=[("file", ("secret.txt", SECRET.encode(), "text/plain")), ("file", ("garden.md", OTHER.encode(), "text/markdown"))],
)
assert r.status_code == 200, r.text
uploads = r.json()["data"]
assert [u["filename"] for u in uploads] == ["secret.txt", "garden.md"], uploads
assert all(u["id"].startswith("file-") and u["chunks"] >= 1 and u["collection"] == "notes" for u in uploads), uploads
secret_id = uploads[0]["id"]

# JSON upload into the same collection.
r = http.post("/documents", json={"collection": "notes", "documents": [{"text": "Paris is the capital of France.", "name": "facts"}]})
assert r.status_code == 200, r.text
facts_id = r.json()["data"][0]["id"]

listed = http.get("/documents", params={"collection": "notes"}).json()["data"]
assert sorted(u["id"] for u in listed) == sorted([secret_id, uploads[1]["id"], facts_id]), listed
assert "rag:notes" in [m.id for m in client.models.list().data]

# A query finds the passage.
q = http.post("/documents/query", json={"query": "What is the secret code?", "collection": "notes", "k": 2}).json()
assert q["data"][0]["document_id"] == secret_id and "PURPLE-HARBOR-42" in q["data"][0]["text"], q
assert q["data"][0]["score"] >= q["data"][1]["score"], q
seen["query_top"] = q["data"][0]["filename"]

# A retrieval chat: the model rag:notes answers from the passage and names its sources.
chat = client.chat.completions.create(
    model="rag:notes", messages=[{"role": "user", "content": "What is the secret code of the furnace project?"}], max_tokens=40, temperature=0
)
sources = chat.model_dump()["sources"]
assert sources[0]["document_id"] == secret_id and "PURPLE-HARBOR-42" in sources[0]["text"], sources
seen["rag_answer"] = chat.choices[0].message.content
# The same with a rag object on the base model, streamed: sources come with the first chunk.
chunks = list(
    client.chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": "Which plants grow well with tomatoes?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        extra_body={"rag": {"collection": "notes", "k": 1, "template": "Context: {context}\nQuestion: {question}"}},
    )
)
first_sources = chunks[0].model_dump().get("sources")
assert first_sources and first_sources[0]["document_id"] == uploads[1]["id"], first_sources
seen["rag_stream_pieces"] = len(chunks)

# Errors: a file type the loaders do not read, an unknown collection, a bad name.
r = http.post("/documents", data={"collection": "notes"}, files=[("file", ("tool.exe", b"MZ\x00\x01", "application/octet-stream"))])
assert r.status_code == 400 and "unsupported file type" in r.json()["error"]["message"], r.text
try:
    client.chat.completions.create(model="rag:nothing-here", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert "nothing-here" in e.message, e
r = http.post("/documents", json={"collection": "../escape", "documents": [{"text": "x"}]})
assert r.status_code == 400 and r.json()["error"]["param"] == "collection", r.text

# Deleting an upload removes its chunks from queries.
r = http.delete(f"/documents/{secret_id}")
assert r.status_code == 200 and r.json()["deleted"] is True, r.text
q = http.post("/documents/query", json={"query": "What is the secret code?", "collection": "notes", "k": 3}).json()
assert all(h["document_id"] != secret_id for h in q["data"]), q
assert http.delete(f"/documents/{secret_id}").status_code == 404
seen["after_delete"] = len(http.get("/documents").json()["data"])
print(json.dumps(seen))
