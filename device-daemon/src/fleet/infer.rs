//! Inference over MQTT: a request published to `.../infer/{model}` is the body of a KServe v2
//! `POST /v2/models/{model}/infer` and is answered by the same HTTP handlers, in process.
//!
//! The reply goes to the MQTT 5 response topic with the request's correlation data; MQTT 3.1.1
//! clients, which have neither, put `"reply_to"` (and optionally `"correlation_id"`) in the
//! request's `parameters`. The reply carries the HTTP status as the user property `status`.

use axum::body::Body;
use axum::http::{header, Request};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tower::ServiceExt;

use super::Topics;

const HEADER_LEN: &str = "inference-header-content-length";

#[derive(Debug, Clone)]
pub(super) struct Responder {
    router: axum::Router,
    client: AsyncClient,
    topics: Topics,
    bearer: Option<String>,
}

/// Where the answer goes and how the requester recognises it.
#[derive(Debug, PartialEq)]
struct ReplyTo {
    topic: String,
    correlation: Option<Bytes>,
}

fn reply_to(p: &Publish) -> Option<ReplyTo> {
    let props = p.properties.as_ref();
    if let Some(topic) = props.and_then(|pp| pp.response_topic.clone()) {
        return Some(ReplyTo {
            topic,
            correlation: props.and_then(|pp| pp.correlation_data.clone()),
        });
    }
    // MQTT 3.1.1: the JSON header names the reply topic.
    let header_len = header_len(p)
        .unwrap_or(p.payload.len())
        .min(p.payload.len());
    let json: serde_json::Value = serde_json::from_slice(&p.payload[..header_len]).ok()?;
    let params = json.get("parameters")?;
    let topic = params.get("reply_to")?.as_str()?.to_owned();
    let correlation = params
        .get("correlation_id")
        .and_then(|c| c.as_str())
        .map(|c| Bytes::copy_from_slice(c.as_bytes()));
    Some(ReplyTo { topic, correlation })
}

fn header_len(p: &Publish) -> Option<usize> {
    p.properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(HEADER_LEN))
        .and_then(|(_, v)| v.parse().ok())
}

impl Responder {
    pub(super) fn new(
        router: axum::Router,
        client: AsyncClient,
        topics: Topics,
        bearer: Option<String>,
    ) -> Responder {
        Responder {
            router,
            client,
            topics,
            bearer,
        }
    }

    pub(super) fn wants(&self, p: &Publish) -> bool {
        std::str::from_utf8(&p.topic)
            .ok()
            .and_then(|t| self.topics.infer_model(t))
            .is_some()
    }

    /// Answers one request on its own task: requests are independent and the batcher
    /// groups concurrent ones.
    pub(super) fn spawn(&self, p: Publish) {
        let this = self.clone();
        tokio::spawn(async move { this.answer(p).await });
    }

    async fn answer(self, p: Publish) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let Some(model) = self.topics.infer_model(&topic).map(str::to_owned) else {
            return;
        };
        let Some(reply) = reply_to(&p) else {
            log::warn!("mqtt infer: a request on {topic} names no reply topic; dropped");
            return;
        };
        let mut request = Request::post(format!("/v2/models/{model}/infer"));
        let content_type = p
            .properties
            .as_ref()
            .and_then(|pp| pp.content_type.clone())
            .unwrap_or_else(|| "application/json".into());
        request = request.header(header::CONTENT_TYPE, content_type);
        if let Some(n) = header_len(&p) {
            request = request.header(HEADER_LEN, n);
        }
        if let Some(token) = &self.bearer {
            // The broker's ACL already decided who may publish here.
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let Ok(request) = request.body(Body::from(p.payload)) else {
            return;
        };
        let response = match self.router.oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = response.status().as_u16();
        let mut user_properties = vec![("status".to_owned(), status.to_string())];
        if let Some(v) = response
            .headers()
            .get(HEADER_LEN)
            .and_then(|v| v.to_str().ok())
        {
            user_properties.push((HEADER_LEN.to_owned(), v.to_owned()));
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match axum::body::to_bytes(response.into_body(), usize::MAX).await {
            Ok(b) => b,
            Err(e) => {
                log::warn!("mqtt infer: reading the response: {e}");
                return;
            }
        };
        let props = PublishProperties {
            correlation_data: reply.correlation,
            user_properties,
            content_type,
            ..Default::default()
        };
        if let Err(e) = self
            .client
            .publish_with_properties(reply.topic, QoS::AtLeastOnce, false, body, props)
            .await
        {
            log::warn!("mqtt infer: replying: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(payload: &'static [u8], props: Option<PublishProperties>) -> Publish {
        let mut p = Publish::new("tern/v1/f/infer/m", QoS::AtLeastOnce, payload, props);
        p.retain = false;
        p
    }

    #[test]
    fn mqtt5_requests_reply_to_their_response_topic() {
        let props = PublishProperties {
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"c1")),
            ..Default::default()
        };
        let r = reply_to(&publish(b"{}", Some(props))).unwrap();
        assert_eq!(r.topic, "r/1");
        assert_eq!(r.correlation.as_deref(), Some(&b"c1"[..]));
    }

    #[test]
    fn mqtt311_requests_name_their_reply_topic_in_parameters() {
        let body = br#"{"inputs":[],"parameters":{"reply_to":"r/2","correlation_id":"x"}}"#;
        let r = reply_to(&publish(body, None)).unwrap();
        assert_eq!(r.topic, "r/2");
        assert_eq!(r.correlation.as_deref(), Some(&b"x"[..]));
        assert!(reply_to(&publish(b"{\"inputs\":[]}", None)).is_none());
        assert!(reply_to(&publish(b"\xff\x00", None)).is_none());
    }
}
