package e2e_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// A request no API route takes, an unknown path under /v1/, a method a
// path does not have or a path with a "." or empty segment, gets the API's
// JSON error; the web page is still served at /.
func TestUnknownAPIRequestsGetJSONErrors(t *testing.T) {
	p := trtest.Serve(t)
	tests := []struct {
		method, path string
		status       int
		code, allow  string
	}{
		{"GET", "/v1/nope", 404, "not_found", ""},
		{"GET", "/v1/conversations/c1/messages/", 404, "not_found", ""},
		{"GET", "/v1/turns/t1/cancel", 405, "bad_request", "POST"},
		{"PUT", "/v1/conversations/c1", 405, "bad_request", "DELETE"},
		{"POST", "/healthz", 405, "bad_request", "GET"},
		// Not redirected to the cleaned path, which is another resource.
		{"POST", "/v1/conversations/./messages", 400, "bad_request", ""},
		{"GET", "/v1/conversations/../messages", 400, "bad_request", ""},
		{"GET", "/v1//conversations", 400, "bad_request", ""},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			req, err := http.NewRequest(tt.method, p.URL+tt.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var body struct {
				Error struct{ Code, Message string } `json:"error"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
				t.Fatalf("%d, body not JSON: %v", resp.StatusCode, err)
			}
			if resp.StatusCode != tt.status || body.Error.Code != tt.code || body.Error.Message == "" {
				t.Fatalf("%d %+v, want %d %s", resp.StatusCode, body.Error, tt.status, tt.code)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
			if allow := resp.Header.Get("Allow"); !strings.Contains(allow, tt.allow) {
				t.Fatalf("Allow %q, want it to name %s", allow, tt.allow)
			}
		})
	}
	// The ids "." and ".." are reached escaped.
	for _, id := range []string{"%2E", "%2E%2E"} {
		resp, err := http.Post(p.URL+"/v1/conversations/"+id+"/messages", "application/json", strings.NewReader(`{"text":"dots"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 202 {
			t.Fatalf("POST to conversation %s: %d", id, resp.StatusCode)
		}
		var got struct {
			Messages []struct {
				ConversationID string `json:"conversation_id"`
			}
		}
		if code := trtest.Get(t, p.URL+"/v1/conversations/"+id+"/messages", &got); code != 200 || len(got.Messages) == 0 || got.Messages[0].ConversationID != strings.ReplaceAll(id, "%2E", ".") {
			t.Fatalf("GET conversation %s: %d %+v", id, code, got)
		}
	}
	resp, err := http.Get(p.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET / answered %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	// The page's own files only: no image, script or frame from elsewhere.
	for h, want := range map[string]string{
		"Content-Security-Policy": "img-src 'self' data:",
		"X-Frame-Options":         "DENY",
		"X-Content-Type-Options":  "nosniff",
	} {
		if got := resp.Header.Get(h); !strings.Contains(got, want) {
			t.Errorf("GET / %s: %q, want it to hold %q", h, got, want)
		}
	}
}
