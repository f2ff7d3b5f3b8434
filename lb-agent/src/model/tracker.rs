//! The change tracker: sources report object changes, the tracker keeps the
//! `ClusterState` they add up to and remembers which Services they touch, so
//! the translation redoes only those (kube-proxy's ServiceChangeTracker and
//! EndpointsChangeTracker, as one type).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;

use super::{
    ClusterState, ObjectKey,
    records::{ServiceRecord, SliceRecord},
};

/// One object added, replaced (`Some`) or deleted (`None`).
#[derive(Clone, Debug)]
pub enum Change {
    Service(ObjectKey, Option<Arc<ServiceRecord>>),
    EndpointSlice(ObjectKey, Option<Arc<SliceRecord>>),
    Node(String, Option<Arc<Node>>),
    /// A ServiceCIDR object by name: its CIDRs.
    ServiceCidr(String, Option<Arc<Vec<ipnet::IpNet>>>),
}

/// What changed since the translation last looked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Services whose object or whose EndpointSlices changed.
    pub services: BTreeSet<ObjectKey>,
    /// EndpointSlices added, changed or deleted (for the programming-latency metric).
    pub slices: BTreeSet<ObjectKey>,
    /// Some Node changed (this node's zone decides topology hints for all).
    pub nodes: bool,
    /// Some ServiceCIDR changed.
    pub service_cidrs: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty() && !self.nodes && !self.service_cidrs
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(key: &ObjectKey, slice: &SliceRecord) -> Option<ObjectKey> {
    let name = slice.service_name.as_ref()?;
    Some(ObjectKey::new(key.namespace.clone(), name.clone()))
}

/// Service -> its EndpointSlices, by their `kubernetes.io/service-name`.
#[derive(Debug, Default)]
pub struct SlicesByService(BTreeMap<ObjectKey, BTreeSet<ObjectKey>>);

impl SlicesByService {
    /// A slice now belongs to `new` (None: to no Service, or deleted)
    /// instead of `old`.
    pub fn move_slice(
        &mut self,
        slice: &ObjectKey,
        old: Option<&ObjectKey>,
        new: Option<&ObjectKey>,
    ) {
        if old == new {
            return;
        }
        if let Some(svc) = old
            && let Some(set) = self.0.get_mut(svc)
        {
            set.remove(slice);
            if set.is_empty() {
                self.0.remove(svc);
            }
        }
        if let Some(svc) = new {
            self.0.entry(svc.clone()).or_default().insert(slice.clone());
        }
    }

    pub fn of<'a>(&'a self, service: &ObjectKey) -> impl Iterator<Item = &'a ObjectKey> + use<'a> {
        self.0.get(service).into_iter().flatten()
    }

    /// The Service has at least one slice.
    pub fn has(&self, service: &ObjectKey) -> bool {
        self.0.contains_key(service)
    }
}

#[derive(Default)]
pub struct ChangeTracker {
    state: ClusterState,
    slices_by_service: SlicesByService,
    dirty: Dirty,
}

impl ChangeTracker {
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The EndpointSlices of one Service.
    pub fn slices_of<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a SliceRecord)> + 'a {
        self.slices_by_service
            .of(service)
            .filter_map(|k| Some((k, self.state.endpoint_slices.get(k)?.as_ref())))
    }

    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Service(key, service) => {
                let before = match service {
                    Some(s) => self
                        .state
                        .services
                        .insert(key.clone(), s.clone())
                        .map(|_| ()),
                    None => self.state.services.remove(&key).map(|_| ()),
                };
                // A delete of something never seen is no change.
                if before.is_some() || self.state.services.contains_key(&key) {
                    self.dirty.services.insert(key);
                }
            }
            Change::EndpointSlice(key, slice) => {
                let old = match &slice {
                    Some(s) => self.state.endpoint_slices.insert(key.clone(), s.clone()),
                    None => self.state.endpoint_slices.remove(&key),
                };
                if old.is_none() && slice.is_none() {
                    return;
                }
                let old_service = old.as_ref().and_then(|s| slice_service(&key, s));
                let new_service = slice.as_ref().and_then(|s| slice_service(&key, s));
                self.slices_by_service
                    .move_slice(&key, old_service.as_ref(), new_service.as_ref());
                self.dirty.services.extend(old_service);
                self.dirty.services.extend(new_service);
                self.dirty.slices.insert(key);
            }
            Change::Node(name, node) => {
                match node {
                    Some(n) => {
                        self.state.nodes.insert(name, n);
                    }
                    None => {
                        if self.state.nodes.remove(&name).is_none() {
                            return;
                        }
                    }
                }
                self.dirty.nodes = true;
            }
            Change::ServiceCidr(name, cidrs) => {
                match cidrs {
                    Some(c) => {
                        if self.state.service_cidrs.insert(name, c.clone()).as_ref() == Some(&c) {
                            return;
                        }
                    }
                    None => {
                        if self.state.service_cidrs.remove(&name).is_none() {
                            return;
                        }
                    }
                }
                self.dirty.service_cidrs = true;
            }
        }
    }

    /// Replace the whole state (a source that can only say "this is
    /// everything now"): only objects that differ count as changed, compared
    /// by pointer first (sources keep the `Arc` of an unchanged object) and
    /// by value otherwise.
    pub fn replace(&mut self, state: ClusterState) {
        for change in diff(&self.state, &state) {
            self.apply(change);
        }
    }

    /// Hand the accumulated changes to the translation.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
}

/// The changes that turn `old` into `new`.
pub fn diff(old: &ClusterState, new: &ClusterState) -> Vec<Change> {
    let mut changes = Vec::new();
    diff_table(&old.services, &new.services, &mut changes, Change::Service);
    diff_table(
        &old.endpoint_slices,
        &new.endpoint_slices,
        &mut changes,
        Change::EndpointSlice,
    );
    diff_table(&old.nodes, &new.nodes, &mut changes, Change::Node);
    diff_table(
        &old.service_cidrs,
        &new.service_cidrs,
        &mut changes,
        Change::ServiceCidr,
    );
    changes
}

fn diff_table<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, Arc<V>>,
    new: &BTreeMap<K, Arc<V>>,
    out: &mut Vec<Change>,
    change: impl Fn(K, Option<Arc<V>>) -> Change,
) {
    for (key, value) in new {
        match old.get(key) {
            Some(before) if Arc::ptr_eq(before, value) || before == value => {}
            _ => out.push(change(key.clone(), Some(value.clone()))),
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            out.push(change(key.clone(), None));
        }
    }
}
