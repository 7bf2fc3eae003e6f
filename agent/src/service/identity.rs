//! CSI `Identity`: who the plugin is, what it serves, whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::debug;

use super::{
    blocking,
    csi::{
        identity_server::Identity,
        plugin_capability::{self, service::Type as ServiceType},
        GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
        GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
    },
    ServiceOptions,
};
use crate::query::MetadataSource;

pub(super) struct IdentityService {
    source: Arc<dyn MetadataSource>,
    name: String,
    vendor_version: String,
}

impl IdentityService {
    pub(super) fn new(source: Arc<dyn MetadataSource>, options: &ServiceOptions) -> Self {
        IdentityService {
            source,
            name: options.driver_name.clone(),
            vendor_version: options.vendor_version.clone(),
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        debug!("GetPluginInfo");
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: self.vendor_version.clone(),
            manifest: Default::default(),
        }))
    }

    /// "GetPluginCapabilities, which must include
    /// Service{SNAPSHOT_METADATA_SERVICE}" (the sidecar exits otherwise).
    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        debug!("GetPluginCapabilities");
        let service = plugin_capability::Service { r#type: ServiceType::SnapshotMetadataService as i32 };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![PluginCapability { r#type: Some(plugin_capability::Type::Service(service)) }],
        }))
    }

    /// Never an error: the sidecar exits on any Probe error except
    /// DEADLINE_EXCEEDED, and keeps polling while `ready = false`.
    async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let source = self.source.clone();
        let ready = blocking(move || source.ready()).await.unwrap_or(false);
        debug!(ready, "Probe");
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
